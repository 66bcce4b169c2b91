"""Audit sinks under stress, against a real gateway: every request makes exactly one record under
concurrency (SQLite and PostgreSQL); a fail-closed database that goes away turns requests into 503 and back,
losing nothing; a webhook receiver that fails half the time still gets every event (and stdout prints them)."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from conftest import GATEWAY_USERS, VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl
from sqlalchemy import create_engine, text

TOKEN = GATEWAY_USERS["alice"][1]


def request_count(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT count(*) FROM kubegate_audit_events WHERE kind = 'request'")
            ).scalar_one()
    finally:
        engine.dispose()


def settled_count(database_url: str, expected: int, timeout: float = 60.0) -> int:
    """The number of request records once it reaches `expected` or stops growing."""
    deadline, last, stable_since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = request_count(database_url)
        if count != last:
            last, stable_since = count, time.monotonic()
        if count >= expected and time.monotonic() - stable_since > 1.0:
            return count
        time.sleep(0.2)
    return last


async def hammer(gw: Gateway, path: str, count: int, concurrency: int = 64) -> list[int]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    statuses: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=concurrency)
    ) as session:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.get(
                    f"{gw.url}/k8s/sandbox{path}", headers={"Authorization": f"Bearer {TOKEN}"}
                ) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def audited_gateway(sandbox, directory: Path, database_url: str | None, **audit_db) -> Gateway:
    config = gateway_config(sandbox, directory, free_port())
    config["connections"]["sandbox"]["plugins"]["audit-db"] = {}
    if database_url:
        config["database"] = {"url": database_url}
    config["plugins"] = {"audit-db": audit_db}
    return start_gateway(directory, config)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'kubegate.db'}"
    return request.getfixturevalue("postgres").create_database(f"audit_load_{free_port()}")


def test_ten_thousand_requests_make_ten_thousand_records(sandbox, tmp_path, database_url):
    gw = audited_gateway(sandbox, tmp_path, database_url)
    try:
        statuses = asyncio.run(hammer(gw, "/version", 10_000))
        assert statuses.count(200) == 10_000
        assert settled_count(database_url, 10_000) == 10_000
    finally:
        stop_process(gw.process)
    from kubegate.core.db import Database
    from kubegate.plugins.audit import store

    database = Database(database_url)
    assert database.call(lambda s: store.verify(s)) == (10_000, None)
    database.close()


def escaped_token(idp, subject: str) -> str:
    """A token of `idp` whose payload is written with JSON escapes (`\\u0000`, `\\ud800`), as an IdP's JSON
    encoder may write them (joserfc's own encoder cannot write a lone surrogate)."""
    from joserfc import jws
    from oidc_idp import RSA_KEY

    now = int(time.time())
    payload = {"iss": idp.url, "aud": idp.audience, "sub": subject, "iat": now, "exp": now + 600}
    return jws.serialize_compact({"alg": "RS256", "kid": RSA_KEY.kid}, json.dumps(payload).encode(), RSA_KEY)


@pytest.mark.parametrize("subject", ["al\x00ice", "al\ud800ice"])
def test_a_user_name_no_column_can_hold_is_recorded_and_so_is_everything_after_it(
    sandbox, tmp_path, database_url, subject
):
    """An IdP-signed token whose subject holds NUL or a lone surrogate (JSON `\\u0000`, `\\ud800`): the
    gateway refuses to impersonate it (403) before any policy or approval hold sees it, and audits the
    refusal. That record's `user` column was a string
    PostgreSQL text (NUL) or no database (a lone surrogate) can hold: its batch failed on every retry and
    audit-db recorded nothing after it (with `on_failure: closed`, every request refused). Now the column
    holds U+FFFD, and the next request is recorded too."""
    from oidc_idp import IdP

    idp = IdP("kubegate-e2e")
    config = gateway_config(sandbox, tmp_path, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    plugins["oidc"] = {"issuers": [{"issuer": idp.url, "audiences": ["kubegate-e2e"]}]}
    plugins["audit-db"] = {}
    # Every request of the IdP's users is held for approval: the refusal comes before any hold stores them.
    plugins["policy"] = {"rules": [{"name": "hold-idp-users", "match": {"users": [f"{idp.url}#*"]},
                                    "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}}]}  # fmt: skip
    plugins["approvals"] = {}
    config["database"] = {"url": database_url}
    gw = start_gateway(tmp_path, config)
    try:
        context = ssl.create_default_context(cafile=str(gw.ca_file))
        host, port = gw.url.removeprefix("https://").rsplit(":", 1)
        answers = []
        for token in (escaped_token(idp, subject), TOKEN):
            connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
            connection.request("GET", "/k8s/sandbox/version", headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            answers.append((response.status, response.read().decode()))
            connection.close()
        assert [status for status, _ in answers] == [403, 200]
        assert "cannot be impersonated" in answers[0][1]
        assert settled_count(database_url, 2, timeout=15) == 2
    finally:
        stop_process(gw.process)
        idp.close()
    from kubegate.core.db import Database
    from kubegate.plugins.audit import store

    database = Database(database_url)
    rows = database.call(lambda s: s.exec(store.select(store.AuditRow).order_by(store.AuditRow.seq)).all())
    users = [r.user for r in rows if r.kind == "request"]
    assert users[0].endswith("#al\ufffdice") and users[1:] == ["alice"]  # oidc prefixes the issuer
    assert database.call(lambda s: store.verify(s))[1] is None
    database.close()


@pytest.fixture
def private_postgres() -> Iterator:
    from postgres import start_postgres

    directory = Path(tempfile.mkdtemp(prefix="kubegate-pg-outage-"))
    server = start_postgres(directory, free_port())
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_a_fail_closed_database_that_goes_away_turns_requests_into_503_and_back(
    sandbox, tmp_path, private_postgres
):
    url = private_postgres.url
    gw = audited_gateway(sandbox, tmp_path, url, on_failure="closed")
    made = 0

    def one() -> tuple[int, dict]:
        nonlocal made
        made += 1
        status, body = asyncio.run(get_json(gw, "/version"))
        return status, body

    try:
        assert all(one()[0] == 200 for _ in range(5))
        private_postgres.stop()
        deadline = time.monotonic() + 30
        status, body = one()
        while status != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            status, body = one()
        assert status == 503, "requests were still served with the audit store down"
        assert body["kind"] == "Status" and "audit store" in body["message"]
        assert all(one()[0] == 503 for _ in range(3))  # stays closed while the store is down
        ready_status, report = asyncio.run(get_json(gw, "/readyz", prefix=""))
        assert ready_status == 503 and report["connections"]["sandbox"].startswith("audit-db: cannot write")
        private_postgres.start()
        deadline = time.monotonic() + 30
        while one()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert one()[0] == 200, "requests did not come back after the store did"
        time.sleep(2.1)  # /readyz keeps a result for 2 s
        assert asyncio.run(get_json(gw, "/readyz", prefix=""))[1]["connections"]["sandbox"] == "ok"
        # Nothing was lost: the refused requests' events were kept and written once it came back.
        assert settled_count(url, made) == made
    finally:
        stop_process(gw.process)


async def get_json(gw: Gateway, path: str, prefix: str = "/k8s/sandbox") -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(f"{gw.url}{prefix}{path}", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, await r.json(content_type=None)


class FlakyReceiver(BaseHTTPRequestHandler):
    """Accepts every second POST; remembers the event ids of the accepted ones."""

    posts = 0
    accepted: list[str] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).posts += 1
            fail = self.posts % 2 == 1
            if not fail:
                type(self).accepted += [event["id"] for event in json.loads(body)["events"]]
        self.send_response(500 if fail else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_webhook_receiver_that_fails_half_the_time_loses_nothing(sandbox, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), FlakyReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = gateway_config(sandbox, tmp_path, free_port())
    config["connections"]["sandbox"]["plugins"].update(
        {"audit-db": {}, "audit-webhook": {}, "audit-stdout": {}}
    )
    config["plugins"] = {
        "audit-webhook": {
            "url": f"http://127.0.0.1:{server.server_port}/events",
            "post_batch": 7,
            "retry_seconds": 0.05,
        }
    }
    gw = start_gateway(tmp_path, config)
    try:
        statuses = asyncio.run(hammer(gw, "/version", 300, concurrency=8))
        assert statuses.count(200) == 300
        database_url = f"sqlite:///{tmp_path / 'state' / 'kubegate.db'}"
        assert settled_count(database_url, 300) == 300
        engine = create_engine(database_url)
        with engine.connect() as connection:
            stored = {
                row[0] for row in connection.execute(text("SELECT event_id FROM kubegate_audit_events"))
            }
        engine.dispose()
        deadline = time.monotonic() + 60
        while not stored <= set(FlakyReceiver.accepted) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stored <= set(FlakyReceiver.accepted), (
            f"{len(stored - set(FlakyReceiver.accepted))} never arrived"
        )
        assert FlakyReceiver.posts >= 2 * (300 // 7)  # half of them failed and were retried
        # audit-stdout wrote the same events as JSON lines on the gateway's output (its log here)
        printed = [
            json.loads(line)["audit"]
            for line in gw.log.read_text().splitlines()
            if line.startswith('{"audit":')
        ]
        assert stored <= {event["id"] for event in printed}
    finally:
        stop_process(gw.process)
        server.shutdown()


def unauthenticated(gw: Gateway, user_agent: str) -> int:
    """A request without a token and with `user_agent` (sent as latin-1 bytes: 0xFF is a byte Go reads)."""
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    host, port = gw.url.removeprefix("https://").split(":")
    client = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    client.request("GET", "/k8s/sandbox/api/v1/namespaces/default/pods", headers={"User-Agent": user_agent})
    status = client.getresponse().status
    client.close()
    return status


def test_an_audit_file_records_a_megabyte_user_agent_cut_and_goes_on_after_a_restart(sandbox, tmp_path):
    """A client that is not even authenticated sends a User-Agent of 600,000 double quotes: a head the API
    server would read (under 1 MiB), which JSON wrote as 1.2 MB, one line the restarted gateway misread (it
    refused to start). The record now keeps 4,096 characters of it, with its length and hash (the long
    last line is still read right: test_audit_chain); the restarted gateway records on, and the file's
    chain verifies."""
    config = gateway_config(sandbox, tmp_path, free_port())
    config["connections"]["sandbox"]["plugins"]["audit-file"] = {}
    audit = tmp_path / "audit.jsonl"
    config["plugins"] = {"audit-file": {"path": str(audit)}}
    gw = start_gateway(tmp_path, config)
    try:
        assert unauthenticated(gw, '"' * 600_000) == 401
        deadline = time.monotonic() + 30
        while not (audit.exists() and audit.read_bytes().strip()):
            assert time.monotonic() < deadline, "the refusal was not recorded"
            time.sleep(0.1)
        line = audit.read_bytes().splitlines()[-1]
        assert len(line) < 16 * 1024
        assert json.loads(line)["record"]["data"]["truncated"]["user_agent"]["length"] == 600_000
    finally:
        stop_process(gw.process)
    gw = start_gateway(tmp_path, config)  # the chain goes on from the last line
    try:
        proc = run_kubectl(gw.kubeconfig("alice"), "get", "pods", "-n", "default")
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 30
        while b'"kubectl_command":"kubectl get"' not in audit.read_bytes().splitlines()[-1]:
            assert time.monotonic() < deadline, "the request after the restart was not recorded"
            time.sleep(0.1)
    finally:
        stop_process(gw.process)
    verify = subprocess.run([str(VENV_BIN / "kubegate"), "audit", "verify", "--file", str(audit)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


class PickyReceiver(BaseHTTPRequestHandler):
    """Refuses a body over 1 MiB with 413 (nginx's client_max_body_size, aiohttp's client_max_size), and,
    like a WAF, a batch holding a User-Agent with U+00FF with 400; remembers what it took."""

    accepted: list[dict] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        if length > 1 << 20:
            status = 413
        else:
            events = json.loads(self.rfile.read(length))["events"]
            refused = any("\xff" in ((e.get("data") or {}).get("user_agent") or "") for e in events)
            status = 400 if refused else 200
            if not refused:
                type(self).accepted += events
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def readyz(gw: Gateway) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    host, port = gw.url.removeprefix("https://").split(":")
    client = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    client.request("GET", "/readyz")
    response = client.getresponse()
    answer = response.status, json.loads(response.read())
    client.close()
    return answer


def test_unauthenticated_requests_a_webhook_receiver_refuses_do_not_stop_anyones_delivery(sandbox, tmp_path):
    """Requests without a token, each with a 1 MB User-Agent of 0xFF bytes: their records were 6 MB of JSON
    each, which the receiver refused (413) on every retry; no later event of anyone was delivered, and with
    `on_failure: closed` four of them filled a 16 MiB spool: every caller got 503 (red team). Now each
    record is small, the receiver refuses these (400) one by one, they are kept in the dead-letter file,
    alice's requests go on and are delivered, and /readyz names the dead letters until they are moved away."""
    PickyReceiver.accepted = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), PickyReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = gateway_config(sandbox, tmp_path, free_port())
    config["connections"]["sandbox"]["plugins"]["audit-webhook"] = {}
    spool = tmp_path / "spool"
    config["plugins"] = {"audit-webhook": {"url": f"http://127.0.0.1:{server.server_port}/events",
                                           "retry_seconds": 0.1, "on_failure": "closed", "linger_ms": 0,
                                           "max_spool_bytes": 16 << 20, "spool_dir": str(spool)}}  # fmt: skip
    gw = start_gateway(tmp_path, config)
    try:
        for _ in range(4):
            assert unauthenticated(gw, "\xff" * 1_000_000) == 401
        for _ in range(3):
            status, _ = asyncio.run(get_json(gw, "/api/v1/namespaces/default/pods"))
            assert status == 200
        deadline = time.monotonic() + 30
        while (
            sum(1 for e in PickyReceiver.accepted if (e["data"].get("identity") or {}).get("user") == "alice")
            < 3
        ):
            assert time.monotonic() < deadline, (
                f"alice's requests were not delivered: {PickyReceiver.accepted}"
            )
            time.sleep(0.2)
        dead = [json.loads(line) for line in (spool / "dead-letter.jsonl").read_text().splitlines()]
        assert len(dead) == 4 and all(
            e["data"]["truncated"]["user_agent"]["length"] == 1_000_000 for e in dead
        )
        time.sleep(2.1)  # /readyz answers are reused for 2 s
        status, report = readyz(gw)
        assert status == 503 and "the receiver refused audit events" in report["connections"]["sandbox"]
        (spool / "dead-letter.jsonl").rename(tmp_path / "dead-letter-seen.jsonl")
        time.sleep(2.1)
        assert readyz(gw)[0] == 200
    finally:
        stop_process(gw.process)
        server.shutdown()
