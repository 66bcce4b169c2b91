"""An attack without a token on a fail-closed audit sink that cannot write (red team, preauth).

`audit-webhook` with `on_failure: closed`, its receiver down and a small spool: 401s fill the spool, then
everyone with a token gets 503 — while every further 401 used to be queued and its request's task held
until a write succeeded (2.8 GB resident after 20 s of requests with long headers on one connection). Now
the events of requests without an identity are counted per source while the sink fails, and written as one
`unrecorded` event once it writes again. The real gateway, the real receiver protocol (a local HTTP server
started late), one keep-alive connection as the red team used."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import wait_for

REQUESTS = 3000
LONG = bytes(range(0x80, 0x100)) * 40  # 5,120 bytes: each field is cut to 4,096 characters in the record


@pytest.fixture
def receiver_port() -> int:
    return free_port()


@pytest.fixture
def gw(sandbox, tmp_path, receiver_port) -> Iterator[Gateway]:
    config = gateway_config(sandbox, tmp_path, free_port())
    config["connections"]["sandbox"]["plugins"]["audit-webhook"] = {}
    config["plugins"] = {
        "audit-webhook": {
            "url": f"http://127.0.0.1:{receiver_port}/",  # nobody listens yet
            "on_failure": "closed",
            "max_spool_bytes": 1 << 20,
            "retry_seconds": 0.2,
        }
    }
    gateway = start_gateway(tmp_path, config)
    yield gateway
    stop_process(gateway.process)


def resident_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def flood(gateway: Gateway, count: int) -> dict[int, int]:
    """`count` GETs without a token, with a long User-Agent, Kubectl-Command and Kubectl-Session, one after
    the other on one connection; the statuses answered."""
    request = (b"GET /k8s/sandbox/api/v1/namespaces HTTP/1.1\r\nHost: x\r\nUser-Agent: " + LONG
               + b"\r\nKubectl-Command: " + LONG + b"\r\nKubectl-Session: " + LONG + b"\r\n\r\n")  # fmt: skip
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    context.check_hostname = False
    host, port = gateway.url.split("//")[1].split(":")
    statuses: dict[int, int] = {}
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=60)) as conn:
        for _ in range(count):
            conn.sendall(request)
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += conn.recv(65536)
            head, _, rest = buffer.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head)[1])  # type: ignore[index]
            while len(rest) < length:
                rest += conn.recv(65536)
            status = int(head.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
    return statuses


def metric(gateway: Gateway, name: str) -> float:
    status, text = gateway.get("/metrics")
    assert status == 200
    found = re.search(rf'(?m)^{name}{{sink="audit-webhook"}} (\S+)$', text)
    assert found, f"{name} not in /metrics"
    return float(found[1])


class Receiver(BaseHTTPRequestHandler):
    events: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.events.extend(json.loads(body)["events"])
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_requests_without_a_token_neither_grow_a_failing_fail_closed_sink_nor_wait(gw, receiver_port):
    before = resident_mb(gw.process.pid)
    statuses = flood(gw, REQUESTS)
    grown = resident_mb(gw.process.pid) - before
    assert statuses == {401: REQUESTS}
    # The spool filled: the sink fails, so alice (a token) is refused, with a Status.
    assert gw.get("/k8s/sandbox/api/v1/namespaces")[0] == 401  # no token: 401, and counted
    code, text = alice_get(gw)
    assert code == 503 and "cannot record requests" in json.loads(text)["message"]
    queued = metric(gw, "kubegate_audit_queue_depth")
    print(f"{REQUESTS} requests without a token: resident memory grew {grown} MB; {queued:.0f} queued")
    # Before: every 401 after the spool filled was queued, and its request held (about 57 KB each: 170 MB
    # for these requests, and no bound but memory). Now a 401 is queued only while the sink writes and its
    # queue is less than half full (64 MiB by estimate; about 700 such events, each held meanwhile).
    assert queued < 1000 and grown < 100, f"{queued:.0f} events queued, {grown} MB more resident"
    unrecorded = metric(gw, "kubegate_audit_unrecorded_events")
    assert unrecorded >= REQUESTS - 1000

    # The receiver comes up: the spool drains, the sink writes again, and the count is recorded.
    Receiver.events = []
    server = ThreadingHTTPServer(("127.0.0.1", receiver_port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def summaries() -> list[dict] | None:
        # The counts may come in more than one `unrecorded` event (one per time the sink wrote again)
        found = [e for e in list(Receiver.events) if e["kind"] == "unrecorded"]
        return found if sum(e["data"]["requests"] for e in found) >= unrecorded else None

    try:
        written = wait_for(summaries, timeout=60, what="the summaries of the unrecorded events")
    except AssertionError:
        kinds = sorted({e["kind"] for e in Receiver.events})
        raise AssertionError(
            f"{len(Receiver.events)} events {kinds}; log: {gw.log.read_text()[-3000:]}"
        ) from None
    finally:
        server.shutdown()
    assert {summary["connection"] for summary in written} == {"sandbox"}
    assert {source for summary in written for source in summary["data"]["sources"]} == {"127.0.0.1"}
    assert alice_get(gw)[0] == 200


def alice_get(gateway: Gateway) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    request = urllib.request.Request(
        gateway.url + "/k8s/sandbox/api/v1/namespaces",
        headers={"Authorization": "Bearer alice-token-0123456789abcdef"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
