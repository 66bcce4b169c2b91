"""Pods and services for the tests of the routes that reach containers: an HTTP echo server a pod runs
(what `pods/proxy` and `services/proxy` reach), and helpers to create them and wait for them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetest import run_kubectl

ECHO_PORT = 8000
# The pod's own server: it binds the port the sandbox runtime gives it for containerPort 8000
# (SANDBOX_LISTEN_PORT_8000, see sandbox/runtime.py) and answers every request with what it received.
ECHO_SERVER = """
import http.server, json, os

class Echo(http.server.BaseHTTPRequestHandler):
    def reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        seen = {"method": self.command, "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": self.rfile.read(length).decode()}
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = reply

    def log_message(self, *args):
        pass

port = int(os.environ["SANDBOX_LISTEN_PORT_8000"])
http.server.HTTPServer(("127.0.0.1", port), Echo).serve_forever()
"""


def echo_pod(name: str, namespace: str, app: str = "echo") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "containers": [
                {
                    "name": "echo",
                    "image": "python:3.11",
                    "command": ["python3", "-c", ECHO_SERVER],
                    "ports": [{"name": "web", "containerPort": ECHO_PORT}],
                }
            ]
        },
    }


def echo_service(name: str, namespace: str, app: str = "echo") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]},
    }


def sleeper_pod(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}]},
    }


def apply(kubeconfig: Path | str, *manifests: dict[str, Any]) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
    run_kubectl(kubeconfig, "create", "--validate=false", "-f", "-", input=json.dumps(doc), check=True)


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def echo_ready(kubeconfig: Path | str, namespace: str, pod: str) -> None:
    """Wait until the pod's echo server answers through pods/proxy (python takes a moment to start)."""

    def answers() -> bool:
        got = run_kubectl(
            kubeconfig, "get", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/proxy/ready"
        )
        return got.returncode == 0 and '"path": "/ready"' in got.stdout

    wait_for(answers, what=f"the echo server of {namespace}/{pod}")


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def eviction_protobuf(name: str, namespace: str, *, dry_run: bool = False) -> bytes:
    """A policy/v1 Eviction as kubectl drain (client-go's typed client) POSTs it: application/vnd.kubernetes.protobuf,
    the `k8s\\x00` envelope around a runtime.Unknown."""
    options = _field(5, b"All") if dry_run else b""
    eviction = _field(1, _field(1, name.encode()) + _field(3, namespace.encode())) + _field(2, options)
    type_meta = _field(1, b"policy/v1") + _field(2, b"Eviction")
    return b"k8s\x00" + _field(1, type_meta) + _field(2, eviction)
