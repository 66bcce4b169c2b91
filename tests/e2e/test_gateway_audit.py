"""Audit end to end: real kubectl through the gateway; events land in the database and a JSON-lines file,
hash-chained and signed; `kubegate audit …` finds them per command; request bodies are stored masked."""

from __future__ import annotations

import base64
import json
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GATEWAY_USERS, VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl, wait_for

MARKER = "<masked by kubegate>"
POLICY = {"default": "allow", "rules": [{"name": "bots-never-delete-in-prod", "action": "deny",
          "match": {"groups": ["ci"], "verbs": ["delete"], "namespaces": ["prod"]},
          "message": "CI may not delete anything in prod"}]}  # fmt: skip
SIGNING_KEY = "a signing key kept outside the database, 32+ bytes\n"


@pytest.fixture(scope="module")
def audited(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-audit")
    (directory / "audit.key").write_text(SIGNING_KEY)
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    plugins.update({"policy": POLICY, "masking": {}, "audit-db": {}, "audit-file": {}, "recording": {}})
    config["plugins"] = {
        "audit-db": {"signing_algorithm": "hmac-sha256", "signing_key_file": str(directory / "audit.key"),
                     "readers": ["readonly"], "on_failure": "closed"},
        "audit-file": {"path": str(directory / "audit.jsonl")},
    }  # fmt: skip
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def kc(gw: Gateway, *args: str, user: str = "alice", check: bool = True) -> subprocess.CompletedProcess:
    return run_kubectl(gw.kubeconfig(user), *args, check=check)


def kubegate(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "kubegate"), *args, "--config", str(gw.config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def events(gw: Gateway, *filters: str) -> list[dict]:
    proc = kubegate(gw, "audit", "search", "-o", "json", "--limit", "0", *filters)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stored_bytes(gw: Gateway) -> bytes:
    """Everything the database and the audit file hold, raw (SQLite keeps recent writes in its WAL)."""
    state = Path(json.loads(json.dumps(str(gw.dir / "state"))))
    return b"".join(
        p.read_bytes() for p in [*state.glob("kubegate.db*"), gw.dir / "audit.jsonl"] if p.exists()
    )


def api(gw: Gateway, path: str, user: str) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    request = urllib.request.Request(
        f"{gw.url}{path}", headers={"Authorization": f"Bearer {GATEWAY_USERS[user][1]}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_kubectl_command_is_recorded_with_who_what_and_outcome(audited):
    kc(audited, "get", "pods", "-n", "prod")
    denied = kc(audited, "delete", "pod", "web", "-n", "prod", user="ci-bot", check=False)
    assert denied.returncode != 0 and "CI may not delete anything in prod" in denied.stderr

    found = wait_for(lambda: events(audited, "--user", "ci-bot", "--verb", "delete"), "ci-bot's delete event",
                     timeout=15, interval=0.2)  # fmt: skip
    (event,) = found
    data = event["data"]
    assert data["identity"]["user"] == "ci-bot" and data["identity"]["groups"] == ["ci", "deployers"]
    assert data["identity"]["method"] == "static-tokens"
    assert data["attributes"]["namespace"] == "prod" and data["attributes"]["name"] == "web"
    assert data["decision"] == {"verdict": "deny", "reason": "CI may not delete anything in prod",
                                "rule": "bots-never-delete-in-prod"}  # fmt: skip
    assert (
        data["status"] == 403 and data["source"] == "127.0.0.1" and data["user_agent"].startswith("kubectl")
    )
    assert data["kubectl_command"] == "kubectl delete" and data["kubectl_session"]
    assert data["latency_ms"] >= 0

    commands = kubegate(audited, "audit", "commands", "--user", "ci-bot")
    assert commands.returncode == 0, commands.stderr
    line = next(line for line in commands.stdout.splitlines() if "delete" in line)
    assert "ci-bot ran `kubectl delete` on sandbox → 1 call, 1 denied" in line
    listed = json.loads(kubegate(audited, "audit", "commands", "--user", "alice", "-o", "json").stdout)
    assert any(group["command"] == "kubectl get" and group["calls"] >= 1 and group["denied"] == 0
               for group in listed)  # fmt: skip


def test_request_bodies_are_stored_masked(audited):
    name = f"audited-{int(time.time())}"
    # kubectl sends this body as Kubernetes protobuf
    kc(
        audited,
        "create",
        "secret",
        "generic",
        name,
        "-n",
        "dev",
        "--from-literal=password=audit-s3cret-value",
    )
    found = wait_for(lambda: [e for e in events(audited, "--verb", "create", "--resource", "secrets")
                              if name in json.dumps(e)], f"the create event of secret {name}",
                     timeout=15, interval=0.2)  # fmt: skip
    body = found[0]["data"]["request_body"]
    assert body["bytes"] > 0 and len(body["sha256"]) == 64
    content = json.loads(body["content"])
    assert content["metadata"]["name"] == name
    assert base64.b64decode(content["data"]["password"]).decode() == MARKER
    wait_for(lambda: name in (audited.dir / "audit.jsonl").read_text(), f"the audit file to record secret {name}",
             ignore=(FileNotFoundError,))  # fmt: skip
    raw = stored_bytes(audited)
    assert b"audit-s3cret-value" not in raw
    assert base64.b64encode(b"audit-s3cret-value") not in raw


def test_an_authentication_failure_is_recorded_without_the_token(audited):
    bad = "not-a-real-token-0123456789"
    proc = run_kubectl(audited.kubeconfig("alice", token=bad), "get", "pods", check=False)
    assert proc.returncode != 0
    found = wait_for(lambda: events(audited, "--decision", "unauthenticated"), "an unauthenticated event",
                     timeout=15, interval=0.2)  # fmt: skip
    assert found and found[-1]["data"]["status"] == 401
    assert found[-1]["data"]["credential"].startswith("sha256:")
    assert bad.encode() not in stored_bytes(audited)


def test_the_api_shows_auditors_everything_and_others_their_own(audited):
    kc(audited, "get", "pods", "-n", "dev", user="ci-bot")
    wait_for(lambda: events(audited, "--user", "ci-bot"), "ci-bot's events", timeout=15, interval=0.2)
    status, mine = api(audited, "/api/audit/events?limit=500", "alice")
    assert (
        status == 200
        and mine["items"]
        and {e["data"]["identity"]["user"] for e in mine["items"]} == {"alice"}
    )
    status, _refused = api(audited, "/api/audit/events?user=ci-bot", "alice")
    assert status == 403
    status, everything = api(audited, "/api/audit/events?limit=500", "bob")  # bob is in `readers`
    users = {(e["data"].get("identity") or {}).get("user") for e in everything["items"]}
    assert status == 200 and {"alice", "ci-bot"} <= users
    status, commands = api(audited, "/api/audit/commands?user=ci-bot", "bob")
    assert status == 200 and commands["items"]
    status, chain = api(audited, "/api/audit/verify", "bob")
    assert status == 200 and chain["intact"] and chain["checked"] >= 3
    assert api(audited, "/api/audit/verify", "alice")[0] == 403
    assert api(audited, "/api/audit/events?since=yesterday", "bob")[0] == 400


def stored_counts(gw: Gateway) -> tuple[int, int]:
    """(rows in the audit table, lines in the audit file)."""
    database = sqlite3.connect(gw.dir / "state" / "kubegate.db")
    try:
        (rows,) = database.execute("SELECT count(*) FROM kubegate_audit_events").fetchone()
    finally:
        database.close()
    path = gw.dir / "audit.jsonl"
    return rows, len(path.read_bytes().splitlines()) if path.exists() else 0


def test_verify_passes_then_catches_an_edited_row(audited):
    rows, lines = stored_counts(audited)
    kc(audited, "get", "pods", "-n", "prod")
    wait_for(lambda: (now := stored_counts(audited))[0] > rows and now[1] > lines,
             "the get's event in the audit table and the audit file")  # fmt: skip
    intact = kubegate(audited, "audit", "verify", "--key-file", str(audited.dir / "audit.key"),
                      "--algorithm", "hmac-sha256")  # fmt: skip
    assert intact.returncode == 0 and intact.stdout.startswith("intact:"), intact.stdout + intact.stderr
    file_check = kubegate(audited, "audit", "verify", "--file", str(audited.dir / "audit.jsonl"))
    assert file_check.returncode == 0, file_check.stdout
    database = sqlite3.connect(audited.dir / "state" / "kubegate.db")
    with database:
        (seq, record) = database.execute(
            "SELECT seq, record FROM kubegate_audit_events ORDER BY seq LIMIT 1 OFFSET 1"
        ).fetchone()
        database.execute("UPDATE kubegate_audit_events SET record = ? WHERE seq = ?",
                         (record.replace('"status":', '"status":1', 1), seq))  # fmt: skip
    database.close()
    broken = kubegate(audited, "audit", "verify")
    assert broken.returncode == 1 and f"record {seq}: modified" in broken.stdout, broken.stdout


def test_bad_filters_get_one_line(audited):
    proc = kubegate(audited, "audit", "search", "--since", "last tuesday")
    assert proc.returncode == 2 and proc.stderr.startswith("kubegate: error: since 'last tuesday'")
    assert "Traceback" not in proc.stderr


@pytest.mark.needs_pods
def test_replay_walks_an_identitys_calls_and_sessions_in_order(audited):
    kc(audited, "get", "pods", "-n", "dev", user="ci-bot")
    kc(audited, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo walked-through-$((6*7))", user="ci-bot")
    kc(audited, "get", "configmaps", "-n", "dev", user="ci-bot")
    wait_for(lambda: events(audited, "--user", "ci-bot", "--kind", "session_end"), "ci-bot's session_end event",
             timeout=15, interval=0.2)  # fmt: skip
    walk = kubegate(audited, "replay", "--user", "ci-bot", "--since", "10m", "--speed", "1000")
    assert walk.returncode == 0, walk.stderr
    assert "walked-through-42" in walk.stdout  # the session, played
    lines = walk.stderr.splitlines()
    order = [i for i, line in enumerate(lines) if "pods" in line and "list" in line]
    session = next(i for i, line in enumerate(lines) if "── session" in line)
    after = [i for i, line in enumerate(lines) if "configmaps" in line]
    assert order and after and order[0] < session < after[-1], walk.stderr
    refused = kubegate(audited, "replay")
    assert refused.returncode == 2 and "--user" in refused.stderr
