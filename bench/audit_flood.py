#!/usr/bin/env python3
"""Requests without a token against a fail-closed audit sink that cannot write: the gateway's memory.

    PYTHONPATH=.typecheck .venv/bin/python bench/audit_flood.py [--seconds 10]

The red team's setup (docs/audit.md, "Sinks and failure"): `audit-webhook` with `on_failure: closed`, its
receiver down, a 1 MiB spool; one client connection sends `GET /k8s/sandbox/api/v1/namespaces` without a
token and with User-Agent, Kubectl-Command and Kubectl-Session of 5,120 bytes 0x80-0xFF each, one request
after the other, for `--seconds`. Prints the statuses, the gateway's resident memory (VmRSS from
/proc/PID/status) before and after, the sink's queue and counts from /metrics, and what a user with a token
gets. An experiment, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kubegate.testing import free_port, start_gateway_process, start_sandbox

TOKEN = "alice-token-0123456789abcdef"
LONG = bytes(range(0x80, 0x100)) * 40


def resident_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def get(url: str, ca_file: Path, token: str | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(ca_file))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), context=context
        ) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="audit-flood-"))
    sandbox = start_sandbox(directory / "sandbox")
    (directory / "upstream-token").write_text(sandbox.token)
    config = {
        "state_dir": str(directory / "state"),
        "connections": {
            "sandbox": {
                "upstream": {
                    "server": sandbox.url,
                    "certificate_authority": str(sandbox.ca_file),
                    "token_file": str(directory / "upstream-token"),
                },
                "plugins": {
                    "static-tokens": {
                        "tokens": [{"user": "alice", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]
                    },
                    "audit-webhook": {},
                },
            }
        },
        "plugins": {
            "audit-webhook": {
                "url": f"http://127.0.0.1:{free_port()}/",  # nobody listens
                "on_failure": "closed",
                "max_spool_bytes": 1 << 20,
            }
        },
    }
    gateway = start_gateway_process(config, directory)
    try:
        pid = gateway.process.pid
        before = resident_mb(pid)
        request = (b"GET /k8s/sandbox/api/v1/namespaces HTTP/1.1\r\nHost: x\r\nUser-Agent: " + LONG
                   + b"\r\nKubectl-Command: " + LONG + b"\r\nKubectl-Session: " + LONG + b"\r\n\r\n")  # fmt: skip
        context = ssl.create_default_context(cafile=str(gateway.ca_file))
        context.check_hostname = False
        host, port = gateway.url.split("//")[1].split(":")
        statuses: dict[int, int] = {}
        with context.wrap_socket(socket.create_connection((host, int(port)))) as conn:
            start = time.monotonic()
            while time.monotonic() - start < args.seconds:
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
        after = resident_mb(pid)
        alice, _ = get(gateway.url + "/k8s/sandbox/api/v1/namespaces", gateway.ca_file, TOKEN)
        _, metrics = get(gateway.url + "/metrics", gateway.ca_file)
        counts = dict(re.findall(r'(?m)^kubegate_audit_(\w+)\{sink="audit-webhook"\} (\S+)$', metrics))
        print(f"{args.seconds:g} s without a token: {statuses}; gateway RSS {before} -> {after} MB; "
              f"alice gets {alice}; audit-webhook {counts}")  # fmt: skip
    finally:
        gateway.stop()
        sandbox.stop()


if __name__ == "__main__":
    main()
