"""Every plugin through the agent tunnel: a gateway whose connection `edge` is a `type: agent` connection
(no address, no credential for the cluster) with policy, approvals, masking, recording and the audit
database on it, driven with real kubectl; what reached the sandbox is read back from its request log, and
what the agent did from its own audit log. Streams through the tunnel are isolated: one client that stops
reading a big stream does not hold up the others on the same connection, nor grow the gateway's memory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import pytest
import yaml
from conftest import GATEWAY_USERS, VENV_BIN, Sandbox, stop_process
from e2e.agent_stack import AGENT_CONNECTION, AgentStack, start_agent_stack
from kubetest import Background, PtySession, gateway_api, run_kubectl
from websockets.asyncio.client import connect
from workload_pods import wait_for

from kubegate.connections.agent.upstream import GATEWAY_IDENTITY
from kubegate.plugins.recording.cast import parse_cast
from kubegate.sandbox.seed import DB_PASSWORD

KUBEGATE = str(VENV_BIN / "kubegate")
MARKER = "<masked by kubegate>"
MB = 1024 * 1024
RITA = ("rita-token-0123456789abcdef", ["reviewers"])
DENY_MESSAGE = "configmaps in the edge namespace are kept; ask the platform team"


def policy(namespace: str) -> dict[str, Any]:
    return {
        "default": "allow",
        "rules": [
            {"name": "keep-edge-configmaps", "action": "deny", "message": DENY_MESSAGE,
             "match": {"verbs": ["delete"], "resources": ["configmaps"], "namespaces": [namespace]}},
            {"name": "edge-pod-deletes", "action": "approve", "message": "deleting pods at the edge needs a reviewer",
             "match": {"verbs": ["delete"], "resources": ["pods"], "namespaces": [namespace]},
             "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 120}},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def namespace(sandbox: Sandbox) -> str:
    name = f"edge-{uuid.uuid4().hex[:6]}"
    run_kubectl(sandbox.kubeconfig, "create", "namespace", name, check=True)
    return name


@pytest.fixture(scope="module")
def stack(sandbox: Sandbox, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentStack]:
    people = {**GATEWAY_USERS, "rita": (RITA[1], RITA[0])}
    tokens = [
        {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for user, (groups, token) in people.items()
    ]
    plugins = {
        "static-tokens": {"tokens": tokens},
        "policy": policy(namespace),
        "approvals": {},
        "masking": {"exec_hold_ms": 1000},
        "recording": {},
        "audit-db": {},
    }
    agent_stack = start_agent_stack(sandbox, tmp_path_factory.mktemp("agent-plugins"), plugins=plugins)
    time.sleep(1)  # the masking plugin's known-values follower lists the Secrets once the tunnel is up
    yield agent_stack
    agent_stack.agent.stop()
    stop_process(agent_stack.gateway.process)


def kc(stack: AgentStack, *args: str, user: str = "alice", check: bool = True, **kwargs: Any):
    token = RITA[0] if user == "rita" else None
    return run_kubectl(
        stack.gateway.kubeconfig(user, AGENT_CONNECTION, token=token), *args, check=check, **kwargs
    )


def kubegate(stack: AgentStack, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([KUBEGATE, *args, "--config", str(stack.gateway.config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def last_request_id(sandbox: Sandbox) -> int:
    return max((r["id"] for r in sandbox.requests_log()), default=0)


def agent_audit(stack: AgentStack) -> list[dict[str, Any]]:
    path = stack.agent.config.parent / "agent-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- policy and approvals -------------------------------------------------------------------------------


def test_a_deny_rule_is_enforced_at_the_gateway_and_nothing_reaches_the_cluster(stack, sandbox, namespace):
    name = f"kept-{uuid.uuid4().hex[:6]}"
    run_kubectl(
        sandbox.kubeconfig, "create", "configmap", name, "-n", namespace, "--from-literal=a=1", check=True
    )
    since = last_request_id(sandbox)
    denied = kc(stack, "delete", "configmap", name, "-n", namespace, check=False)
    assert denied.returncode == 1 and f"Error from server (Forbidden): {DENY_MESSAGE}" in denied.stderr
    reached = [r for r in sandbox.requests_log(since) if r["path"].endswith(f"/configmaps/{name}")]
    assert reached == []
    assert not [r for r in agent_audit(stack) if r["path"].endswith(f"/configmaps/{name}")]
    run_kubectl(sandbox.kubeconfig, "get", "configmap", name, "-n", namespace, check=True)  # still there


def test_a_held_delete_is_approved_then_completes_through_the_tunnel(stack, sandbox, namespace):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "victim", "namespace": namespace},
           "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}]}}  # fmt: skip
    run_kubectl(sandbox.kubeconfig, "create", "-f", "-", input=json.dumps(pod), check=True)
    held = subprocess.Popen(
        [str(VENV_BIN / "kubectl"), "delete", "pod", "victim", "-n", namespace],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(stack.kubeconfig("alice")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:

        def pending() -> dict[str, Any] | None:
            status, answer = gateway_api(stack.gateway, "GET", "/api/approvals", RITA[0])
            assert status == 200, answer
            return next((i for i in answer["items"] if i.get("name") == "victim"), None)

        item = wait_for(pending, what="the held delete")
        assert (item["requester"], item["verb"], item["connection"]) == ("alice", "delete", AGENT_CONNECTION)
        time.sleep(1)
        assert held.poll() is None  # still waiting
        run_kubectl(sandbox.kubeconfig, "get", "pod", "victim", "-n", namespace, check=True)  # not sent yet
        status, answer = gateway_api(stack.gateway, "POST", f"/api/approvals/{item['id']}/approve", RITA[0],
                                     {"comment": "ok"})  # fmt: skip
        assert status == 200 and answer["state"] == "approved", answer
        out, err = held.communicate(timeout=60)
    finally:
        if held.poll() is None:
            held.kill()
    assert held.returncode == 0, err
    assert 'pod "victim" deleted' in out
    gone = run_kubectl(sandbox.kubeconfig, "get", "pod", "victim", "-n", namespace)
    assert gone.returncode == 1 and "NotFound" in gone.stderr
    deletes = [
        r for r in agent_audit(stack) if r["method"] == "DELETE" and r["path"].endswith("/pods/victim")
    ]
    assert [(r["user"], r["status"]) for r in deletes] == [("alice", 200)]


# -- masking and recording ------------------------------------------------------------------------------


def test_secrets_are_masked_through_the_tunnel(stack):
    doc = yaml.safe_load(kc(stack, "get", "secret", "db-credentials", "-n", "prod", "-o", "yaml").stdout)
    assert doc["kind"] == "Secret" and doc["data"]
    assert {base64.b64decode(v).decode() for v in doc["data"].values()} == {MARKER}


@pytest.mark.needs_pods
def test_exec_output_carrying_a_secret_value_is_masked(stack, sandbox):
    # No pattern knows `hunter2…`: the gateway knows the value from the Secrets it follows, through the
    # tunnel, as its own identity (the agent forwards no request that does not impersonate someone).
    echo = kc(stack, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo $DB_PASSWORD")
    assert echo.stdout.strip() == MARKER
    assert DB_PASSWORD not in echo.stdout
    followed = [r for r in sandbox.requests_log() if r["path"] == "/api/v1/secrets"
                and r["impersonate_user"] == GATEWAY_IDENTITY]  # fmt: skip
    assert followed and all(r["impersonate_groups"] == [] for r in followed)
    assert followed[0]["authorization_sha256"] == hashlib.sha256(sandbox.token.encode()).hexdigest()
    refused = [
        r for r in agent_audit(stack) if r["path"].startswith("/api/v1/secrets") and r["status"] == 403
    ]
    assert refused == []


@pytest.mark.needs_pods
def test_an_exec_session_through_the_tunnel_is_recorded_and_replayable(stack, tmp_path: Path):
    start = time.time() - 1
    word = f"recorded-{uuid.uuid4().hex[:8]}"
    proc = kc(stack, "exec", "web", "-n", "prod", "--", "sh", "-c", f"echo {word}; echo $DB_PASSWORD")
    assert proc.stdout.splitlines() == [word, MARKER]

    def session() -> dict[str, Any] | None:
        listed = json.loads(kubegate(stack, "sessions", "list", "-o", "json").stdout)
        return next((s for s in listed if s["started"] >= start and s["connection"] == AGENT_CONNECTION
                     and s["ended"] is not None and word in " ".join(s["command"])), None)  # fmt: skip

    found = wait_for(session, what="the recorded exec session")
    assert (found["user"], found["pod"], found["namespace"]) == ("alice", "web", "prod")
    target = tmp_path / "session.cast"
    kubegate(stack, "replay", found["id"], "--export", str(target))
    output = parse_cast(target.read_text()).output()
    assert word in output and MARKER in output and DB_PASSWORD not in output
    replay = subprocess.run([KUBEGATE, "replay", found["id"], "--speed", "1000", "--config",
                             str(stack.gateway.config)], capture_output=True, timeout=60)  # fmt: skip
    assert replay.returncode == 0 and word.encode() in replay.stdout, replay.stderr


# -- audit: the gateway's, the agent's, and what the cluster saw ----------------------------------------


def test_audit_events_carry_the_callers_identity_on_the_agent_connection(stack):
    name = f"audited-{uuid.uuid4().hex[:6]}"
    kc(stack, "get", "configmap", name, "-n", "prod", check=False)

    def found() -> list[dict[str, Any]]:
        proc = kubegate(
            stack, "audit", "search", "-o", "json", "--limit", "0", "--connection", AGENT_CONNECTION
        )
        return [e for e in json.loads(proc.stdout) if (e["data"].get("attributes") or {}).get("name") == name]

    (event,) = wait_for(found, what="the audit event")
    data = event["data"]
    assert data["identity"]["user"] == "alice" and data["identity"]["groups"] == GATEWAY_USERS["alice"][0]
    assert data["status"] == 404 and data["user_agent"].startswith("kubectl")


def test_the_agent_logs_one_line_per_forwarded_request(stack, sandbox):
    name = f"once-{uuid.uuid4().hex[:6]}"
    since = last_request_id(sandbox)
    kc(stack, "get", "configmap", name, "-n", "prod", check=False, user="bob")
    path = f"/api/v1/namespaces/prod/configmaps/{name}"
    lines = wait_for(lambda: [r for r in agent_audit(stack) if r["path"].split("?")[0] == path],
                     what="the agent's audit line")  # fmt: skip
    assert len(lines) == 1
    (line,) = lines
    assert (line["connection"], line["method"], line["status"]) == (AGENT_CONNECTION, "GET", 404)
    assert line["user"] == "bob" and line["groups"] == GATEWAY_USERS["bob"][0]
    assert line["ms"] >= 0 and line["time"] > 0
    assert len([r for r in sandbox.requests_log(since) if r["path"] == path]) == 1  # one request, one line


def test_the_cluster_sees_the_agents_credential_impersonating_the_caller(stack, sandbox):
    name = f"whose-{uuid.uuid4().hex[:6]}"
    since = last_request_id(sandbox)
    kc(stack, "get", "configmap", name, "-n", "prod", check=False, user="ci-bot")
    (record,) = [r for r in sandbox.requests_log(since) if r["path"].endswith(f"/configmaps/{name}")]
    assert record["authorization_sha256"] == hashlib.sha256(sandbox.token.encode()).hexdigest()
    assert record["headers"]["authorization"] == [f"sha256:{record['authorization_sha256']}"]  # only one
    assert record["headers"]["impersonate-user"] == ["ci-bot"]  # the caller's, not also the gateway's own
    assert record["impersonate_groups"] == GATEWAY_USERS["ci-bot"][0]
    # The gateway has nothing to send: neither the cluster's address nor its credential is in its config.
    config = stack.gateway.config.read_text()
    assert sandbox.url not in config and sandbox.token not in config and "token_file" not in config


# -- isolation of channels and backpressure (plain stack: no plugin reads the streams) -----------------

FLOOD_SERVER = """
import http.server, os

class Flood(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = b"x" * 65536
        while True:
            self.wfile.write(chunk)

    def log_message(self, *args):
        pass

port = int(os.environ["SANDBOX_LISTEN_PORT_8000"])
http.server.ThreadingHTTPServer(("127.0.0.1", port), Flood).serve_forever()
"""


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def tunnel_ssl(stack: AgentStack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.gateway.ca_file))


async def stuck_http_stream(
    stack: AgentStack, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that asks for `path` through the gateway, reads the head and the first MB, then stops."""
    url = stack.gateway.connection_url(AGENT_CONNECTION)
    host, port = url.removeprefix("https://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=tunnel_ssl(stack), limit=64 * 1024)
    token = GATEWAY_USERS["alice"][1]
    writer.write(f"GET /k8s/{AGENT_CONNECTION}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Authorization: Bearer {token}\r\nUser-Agent: stuck-client\r\n\r\n".encode())  # fmt: skip
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    if not head.startswith(b"HTTP/1.1 200") or b"content-length" in head.lower():
        # A pod whose server is not listening yet gets a short answer; the flood is endless.
        writer.close()
        raise AssertionError(f"not the flood yet: {head!r}")
    received = 0
    while received < MB:
        received += len(await asyncio.wait_for(reader.read(65536), 30))
    return reader, writer


async def still_served(stack: AgentStack, rounds: int = 3) -> None:
    """Other kubectl calls on the same agent connection complete (each bounded: a hang detector)."""
    kubeconfig = stack.kubeconfig("alice")
    for _ in range(rounds):
        got = await asyncio.to_thread(run_kubectl, kubeconfig, "get", "pods", "-n", "prod", timeout=60)
        assert got.returncode == 0 and "web" in got.stdout, got.stderr
        echo = await asyncio.to_thread(
            run_kubectl, kubeconfig, "exec", "web", "-n", "prod", "--", "echo", "through", timeout=60
        )
        assert echo.stdout == "through\n", echo.stderr


@pytest.mark.needs_pods
async def test_a_stuck_http_stream_does_not_stall_the_connection_or_grow_memory(
    agent_gateway: AgentStack, sandbox: Sandbox, namespace: str
):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flood", "namespace": namespace},
           "spec": {"containers": [{"name": "flood", "image": "python:3.11",
                                    "command": ["python3", "-c", FLOOD_SERVER], "ports": [{"containerPort": 8000}]}]}}  # fmt: skip
    await asyncio.to_thread(
        run_kubectl, sandbox.kubeconfig, "create", "-f", "-", input=json.dumps(pod), check=True
    )
    path = f"/api/v1/namespaces/{namespace}/pods/flood/proxy/"

    gateway_pid, agent_pid = agent_gateway.gateway.process.pid, agent_gateway.agent.process.pid
    deadline = time.monotonic() + 30
    while True:  # python takes a moment to start in the pod
        try:
            reader, writer = await stuck_http_stream(agent_gateway, path)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        before = {pid: rss(pid) for pid in (gateway_pid, agent_pid)}
        await still_served(agent_gateway)
        await asyncio.sleep(3)  # the pod writes as fast as it can; nobody reads
        await still_served(agent_gateway, rounds=1)
        for pid, name in ((gateway_pid, "gateway"), (agent_pid, "agent")):
            grown = rss(pid) - before[pid]
            assert grown < 100 * MB, (
                f"the {name} grew by {grown / MB:.0f} MB while the client was not reading"
            )
        received = 0
        deadline = time.monotonic() + 20
        while received < 50 * MB and time.monotonic() < deadline:  # and it flows again once read
            received += len(await asyncio.wait_for(reader.read(MB), 20))
        assert received >= 50 * MB
    finally:
        writer.close()


@pytest.mark.needs_pods
async def test_a_stuck_exec_stream_does_not_stall_the_connection_or_grow_memory(agent_gateway: AgentStack):
    query = urlencode(
        [("command", "sh"), ("command", "-c"), ("command", "exec cat /dev/zero"), ("stdout", "true")]
    )
    url = agent_gateway.gateway.connection_url(AGENT_CONNECTION).replace("https://", "wss://")
    gateway_pid, agent_pid = agent_gateway.gateway.process.pid, agent_gateway.agent.process.pid
    async with connect(
        f"{url}/api/v1/namespaces/prod/pods/web/exec?{query}",
        subprotocols=["v5.channel.k8s.io"],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {GATEWAY_USERS['alice'][1]}"},
        ssl=tunnel_ssl(agent_gateway),
        max_queue=2,
        max_size=None,
        compression=None,
    ) as ws:
        first = await ws.recv()
        assert first[0] == 1  # stdout
        before = {pid: rss(pid) for pid in (gateway_pid, agent_pid)}
        await still_served(agent_gateway)
        await asyncio.sleep(3)  # upstream would produce gigabytes meanwhile
        await still_served(agent_gateway, rounds=1)
        for pid, name in ((gateway_pid, "gateway"), (agent_pid, "agent")):
            grown = rss(pid) - before[pid]
            assert grown < 100 * MB, (
                f"the {name} grew by {grown / MB:.0f} MB while the client was not reading"
            )
        received = 0
        deadline = time.monotonic() + 20
        while received < 50 * MB and time.monotonic() < deadline:
            received += len(await asyncio.wait_for(ws.recv(), 20))
        assert received >= 50 * MB  # the stream still flows once the client reads again


@pytest.mark.needs_pods
def test_attach_through_the_tunnel(agent_gateway: AgentStack):
    """`kubectl attach` streams the container's output (the pod prints a line every second)."""
    attach = Background(["kubectl", "attach", "web", "-n", "prod"], agent_gateway.kubeconfig("alice"))
    try:
        attach.read_until(r"postgres://", timeout=20)
        attach.read_until(r"postgres://", timeout=10)  # and keeps streaming
        assert attach.alive()
    finally:
        attach.stop()


@pytest.mark.needs_pods
def test_kubectl_run_interactive_attaches_through_the_tunnel(agent_gateway: AgentStack, namespace: str):
    """`kubectl run -it` creates a pod and attaches to its tty (attach with stdin, a pty)."""
    kubeconfig = agent_gateway.kubeconfig("alice")
    name = f"shell-{uuid.uuid4().hex[:6]}"
    session = PtySession(["kubectl", "run", name, "-n", namespace, "--image=busybox", "-it", "--restart=Never",
                          "--command", "--", "sh"], kubeconfig)  # fmt: skip
    try:
        session.send("\n")
        session.send("echo $((7*6))\n")
        session.expect("42", timeout=30)
        session.send("exit 0\n")
        assert session.wait(20) == 0
    finally:
        session.close()
        run_kubectl(kubeconfig, "delete", "pod", name, "-n", namespace, "--wait=false")


@pytest.mark.needs_pods
@pytest.mark.slow
def test_watch_and_logs_follow_stay_open_past_90_seconds_through_the_tunnel(agent_gateway: AgentStack):
    """No time cut anywhere on the tunnel's path: a quiet watch and `logs -f` outlive 90 s."""
    kubeconfig = agent_gateway.kubeconfig("alice")
    name = f"after-95s-{uuid.uuid4().hex[:6]}"
    watch = Background(["kubectl", "get", "configmaps", "-n", "prod", "-w"], kubeconfig)
    logs = Background(["kubectl", "logs", "-f", "web", "-n", "prod", "--tail=1"], kubeconfig)
    try:
        watch.read_until(r"app-config")
        logs.read_until(r"postgres://")
        time.sleep(95)
        assert watch.alive() and logs.alive()
        run_kubectl(kubeconfig, "create", "configmap", name, "-n", "prod", "--from-literal=a=b", check=True)
        watch.read_until(name)
        logs.read_until(r"postgres://", timeout=10)
    finally:
        watch.stop()
        logs.stop()
        run_kubectl(kubeconfig, "delete", "configmap", name, "-n", "prod")
