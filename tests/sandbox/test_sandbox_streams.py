"""exec / attach / cp / port-forward / logs against the sandbox's stream handlers with REAL clients.

The handlers are mounted on a small aiohttp app (``StreamCluster``) that runs in a thread of the test
process: it serves just what kubectl needs around them (pod GET, legacy discovery, pods/log). Every client
is a real one: both kubectl binaries, the ``kubernetes`` Python client (v4.channel.k8s.io) and the
``websockets`` library (base64 and port-forward channel protocols). The full sandbox server mounts the
same handlers; tests/sandbox/test_sandbox_* of the REST server cover the routing there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiohttp import web

from kubegate.sandbox import spdy
from kubegate.sandbox.runtime import (
    POD_ETC,
    PodRuntime,
    choose_isolation,
    configured_isolation,
    parse_cri,
    resolve_in_root,
    rfc3339nano,
    tail_entries,
)
from kubegate.sandbox.streams import handle_attach, handle_exec, handle_portforward

VENV_BIN = Path(sys.executable).parent
KUBECTLS = [k for k in (str(VENV_BIN / "kubectl"), "/usr/bin/kubectl") if os.path.exists(k)]
KUBECTL = KUBECTLS[0]
# Pods run only confined (sandbox/runtime.py): where neither user namespaces nor proot work, every test
# that runs a pod process skips; the confinement tests below still run and check that pods fail closed.
ISOLATION = configured_isolation()
NO_ISOLATION_REASON = "pods cannot be confined here: no proot and no user namespaces (they fail closed)"
needs_isolation = pytest.mark.skipif(ISOLATION is None, reason=NO_ISOLATION_REASON)


def _pod(name: str, containers: list[dict[str, Any]], ns: str = "prod") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": {"app": name}},
        "spec": {"containers": containers},
        "status": {"phase": "Running"},
    }


PODS = [
    _pod(
        "web",
        [
            {
                "name": "web",
                "command": ["sh", "-c", 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'],
                "ports": [{"containerPort": 8080}, {"containerPort": 9090}],
                "env": [
                    {"name": "PLAIN", "value": "v-$(POD)"},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ],
            }
        ],
    ),
    _pod(
        "chat",
        [{"name": "chat", "stdin": True, "command": ["sh", "-c", 'while read l; do echo "got:$l"; done']}],
    ),
    _pod("term", [{"name": "term", "stdin": True, "tty": True, "command": ["sh"]}]),
    _pod("idle", [{"name": "a"}, {"name": "b", "command": ["sh", "-c", "echo done; exit 7"]}]),
]


@dataclass
class StreamCluster:
    url: str
    kubeconfig: Path
    runtime: PodRuntime
    loop: asyncio.AbstractEventLoop
    root: Path

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _make_app(runtime: PodRuntime, pods: dict[tuple[str, str], dict[str, Any]]) -> web.Application:
    app = web.Application()

    def find(req: web.Request) -> dict[str, Any] | None:
        return pods.get((req.match_info["ns"], req.match_info["name"]))

    def not_found(req: web.Request) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f'pods "{req.match_info["name"]}" not found',
            "reason": "NotFound",
            "details": {"name": req.match_info["name"], "kind": "pods"},
            "code": 404,
        }
        return web.json_response(body, status=404)

    async def get_pod(req: web.Request) -> web.StreamResponse:
        pod = find(req)
        return web.json_response(pod) if pod else not_found(req)

    def sub(handler: Any) -> Any:
        async def route(req: web.Request) -> web.StreamResponse:
            pod = find(req)
            return await handler(req, runtime, pod) if pod else not_found(req)

        return route

    async def logs(req: web.Request) -> web.StreamResponse:
        pod = find(req)
        if not pod:
            return not_found(req)
        q = req.query
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(req)
        async for chunk in runtime.stream_logs(
            req.match_info["ns"],
            req.match_info["name"],
            q.get("container") or pod["spec"]["containers"][0]["name"],
            follow=q.get("follow") == "true",
            tail_lines=int(q["tailLines"]) if "tailLines" in q else None,
            timestamps=q.get("timestamps") == "true",
            limit_bytes=int(q["limitBytes"]) if "limitBytes" in q else None,
        ):
            await resp.write(chunk)
        return resp

    async def api(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }
        )

    async def api_v1(_: web.Request) -> web.Response:
        res = [
            {
                "name": "pods",
                "singularName": "pod",
                "namespaced": True,
                "kind": "Pod",
                "verbs": ["get", "list"],
            },
            {
                "name": "pods/exec",
                "singularName": "",
                "namespaced": True,
                "kind": "PodExecOptions",
                "verbs": ["get"],
            },
        ]
        return web.json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": res})

    async def apis(_: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    base = "/api/v1/namespaces/{ns}/pods/{name}"
    app.router.add_get("/api", api)
    app.router.add_get("/api/v1", api_v1)
    app.router.add_get("/apis", apis)
    app.router.add_get(base, get_pod)
    app.router.add_get(base + "/log", logs)
    for verb, handler in (
        ("exec", handle_exec),
        ("attach", handle_attach),
        ("portforward", handle_portforward),
    ):
        app.router.add_route("*", f"{base}/{verb}", sub(handler))
    return app


@contextlib.contextmanager
def _running_cluster(
    root: Path, pods: list[dict[str, Any]], isolation: str | None = None
) -> Iterator[StreamCluster]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    secrets = {("prod", "db", "password"): "s3cret"}
    cms = {("prod", "cfg", "mode"): "fast"}
    by_name = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}

    async def start() -> tuple[PodRuntime, web.AppRunner, int]:
        rt = PodRuntime(root / "pods", lambda *k: secrets.get(k), lambda *k: cms.get(k), isolation)
        runner = web.AppRunner(_make_app(rt, by_name))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        for p in pods:
            await rt.start_pod(p)
        port = runner.addresses[0][1]
        return rt, runner, port

    rt, runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    url = f"http://127.0.0.1:{port}"
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "s", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "s", "context": {"cluster": "s", "user": "u", "namespace": "prod"}}],
                "current-context": "s",
            }
        )
    )
    try:
        yield StreamCluster(url, kubeconfig, rt, loop, root)
    finally:

        async def stop() -> None:
            await rt.close()
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamCluster]:
    if ISOLATION is None:
        pytest.skip(NO_ISOLATION_REASON)
    with _running_cluster(tmp_path_factory.mktemp("streams"), PODS) as c:
        time.sleep(0.5)  # let the containers print their first lines
        yield c


# kubectl speaks WebSocket first; these switches make it use the SPDY/3.1 upgrade instead (its fallback).
TRANSPORTS = {
    "websocket": {},
    "spdy": {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false", "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"},
}


def kubectl(
    c: StreamCluster,
    *args: str,
    input: str | None = None,
    timeout: float = 30,
    binary: str = KUBECTL,
    transport: str = "websocket",
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig), **TRANSPORTS[transport]}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run(
        [binary, *args], input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------
# exec
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("binary", KUBECTLS)
def test_exec_stdout_and_exit_code(cluster: StreamCluster, binary: str, transport: str) -> None:
    r = kubectl(cluster, "exec", "web", "-n", "prod", "--", "echo", "hi", binary=binary, transport=transport)
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = kubectl(cluster, "exec", "web", "--", "sh", "-c", "exit 3", binary=binary, transport=transport)
    assert r.returncode == 3
    assert "command terminated with exit code 3" in r.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_stderr_is_separate(cluster: StreamCluster, transport: str) -> None:
    r = kubectl(cluster, "exec", "web", "--", "sh", "-c", "echo out; echo err >&2", transport=transport)
    assert r.returncode == 0
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_stdin(cluster: StreamCluster, transport: str) -> None:
    data = "".join(f"line {i}\n" for i in range(2000))  # > one pipe buffer: exercises backpressure
    r = kubectl(cluster, "exec", "-i", "web", "--", "cat", input=data, transport=transport)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_exec_env_and_filesystem(cluster: StreamCluster) -> None:
    r = kubectl(cluster, "exec", "web", "--", "sh", "-c", 'echo "$PLAIN $FROM_SECRET $FROM_CM $POD $NS"; pwd')
    assert r.stdout.splitlines() == ["v-$(POD) s3cret fast web prod", "/"]
    # The pod root is the container's "/": files written there land in the pod directory.
    kubectl(cluster, "exec", "web", "--", "sh", "-c", "echo inside > /tmp/marker")
    assert (cluster.runtime.pod_root("prod", "web") / "tmp" / "marker").read_text() == "inside\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_command_not_found(cluster: StreamCluster, transport: str) -> None:
    r = kubectl(cluster, "exec", "web", "--", "nope", transport=transport)
    assert r.returncode == 1
    assert 'exec: "nope": executable file not found in $PATH' in r.stderr
    assert r.stderr.startswith("error: Internal error occurred:")


def test_exec_bad_container_is_400_before_upgrade(cluster: StreamCluster) -> None:
    # kubectl checks container names itself, so ask directly as the gateway would relay it.
    url = f"{cluster.url}/api/v1/namespaces/prod/pods/web/exec?command=true&stdout=true&container=x"
    with pytest.raises(urllib.request.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 400
    body = json.loads(err.value.read())
    assert body["message"] == "container x is not valid for pod web"
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "BadRequest", 400)


def _spawn_in_pty(argv: list[str], env: dict[str, str], rows: int, cols: int) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.execve(argv[0], argv, env)
    return pid, fd


def _read_until(fd: int, needle: bytes, timeout: float = 15) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end and needle not in buf:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def _wait(pid: int, timeout: float = 15) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("kubectl did not exit")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("binary", KUBECTLS)
def test_exec_interactive_tty_and_resize(cluster: StreamCluster, binary: str, transport: str) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "TERM": "xterm", **TRANSPORTS[transport]}
    pid, fd = _spawn_in_pty([binary, "exec", "-it", "web", "--", "sh"], env, rows=33, cols=111)
    try:
        os.write(fd, b"echo $((6*7))\r")
        assert b"42" in _read_until(fd, b"42\r\n")
        os.write(fd, b"stty size\r")
        assert b"33 111" in _read_until(fd, b"33 111")
        # Resize the local terminal: kubectl sends a channel-4 message, the sandbox sets the pty size.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        time.sleep(0.5)
        os.write(fd, b"stty size\r")
        assert b"50 132" in _read_until(fd, b"50 132")
        os.write(fd, b"exit 5\r")
        _read_until(fd, b"exit code 5", timeout=5)
        assert _wait(pid) == 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# attach / logs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_stdin_and_output(cluster: StreamCluster, transport: str) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), **TRANSPORTS[transport]}
    proc = subprocess.Popen(
        [KUBECTL, "attach", "-i", "chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        time.sleep(1.0)
        proc.stdin.write(f"hello-{transport}\n".encode())
        proc.stdin.flush()
        assert proc.stdout.readline() == f"got:hello-{transport}\n".encode()
        proc.stdin.write(b"again\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"got:again\n"
    finally:
        proc.kill()
        proc.wait(5)
    # What the attached client saw is also in the container log.
    r = kubectl(cluster, "logs", "chat")
    assert f"got:hello-{transport}\ngot:again\n" in r.stdout


def test_attach_tty(cluster: StreamCluster) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "TERM": "xterm"}
    pid, fd = _spawn_in_pty([KUBECTL, "attach", "-it", "term"], env, rows=24, cols=80)
    try:
        time.sleep(1.0)
        os.write(fd, b"echo $((7*6))x\r")
        assert b"42x" in _read_until(fd, b"42x")
    finally:
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        os.close(fd)


def test_logs_tail_timestamps_limit_and_follow(cluster: StreamCluster) -> None:
    r = kubectl(cluster, "logs", "web", "--tail=2")
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("tick ") for line in lines)
    r = kubectl(cluster, "logs", "web", "--tail=1", "--timestamps")
    ts, text = r.stdout.rstrip("\n").split(" ", 1)
    assert ts.endswith("Z") and "T" in ts and text.startswith("tick ")
    r = kubectl(cluster, "logs", "web", "--limit-bytes=6")
    assert r.stdout == "tick 0"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.Popen([KUBECTL, "logs", "-f", "--tail=1", "web"], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    try:
        first = int(proc.stdout.readline().split()[1])
        # New lines keep arriving while the container runs (flushed per line, stream stays open).
        following = [int(proc.stdout.readline().split()[1]) for _ in range(3)]
        assert following == [first + 1, first + 2, first + 3]
    finally:
        proc.kill()
        proc.wait(5)


def test_logs_of_exited_container_and_state(cluster: StreamCluster) -> None:
    r = kubectl(cluster, "logs", "idle", "-c", "b")
    assert r.stdout == "done\n"
    state = cluster.runtime.container_state("prod", "idle", "b")
    assert state["terminated"]["exitCode"] == 7
    assert "running" in cluster.runtime.container_state("prod", "idle", "a")
    # Following a finished container ends instead of hanging.
    r = kubectl(cluster, "logs", "-f", "idle", "-c", "b", timeout=10)
    assert r.stdout == "done\n"


def test_cri_log_helpers() -> None:
    ts = rfc3339nano(1700000000.5)
    assert ts == "2023-11-14T22:13:20.5Z"
    entries, used = parse_cri(b"T1 stdout F a\nT2 stdout P b\nT3 stdout F c\nT4 stdout P d\nT5 std")
    assert [e[2] for e in entries] == [b"a\n", b"b", b"c\n", b"d"]
    assert used == len(b"T1 stdout F a\nT2 stdout P b\nT3 stdout F c\nT4 stdout P d\n")
    assert [e[2] for e in tail_entries(entries, 2)] == [b"b", b"c\n", b"d"]


# ---------------------------------------------------------------------------------------------------
# cp
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cp_both_directions(cluster: StreamCluster, tmp_path: Path, transport: str) -> None:
    src = tmp_path / "up.txt"
    src.write_bytes(os.urandom(200_000).hex().encode())
    r = kubectl(cluster, "cp", str(src), "prod/web:/tmp/up.txt", transport=transport)
    assert r.returncode == 0, r.stderr
    assert (cluster.runtime.pod_root("prod", "web") / "tmp/up.txt").read_bytes() == src.read_bytes()
    back = tmp_path / "down.txt"
    r = kubectl(cluster, "cp", "prod/web:/tmp/up.txt", str(back), transport=transport)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------------
# port-forward
# ---------------------------------------------------------------------------------------------------
def _http_get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        return resp.read()


@contextlib.contextmanager
def port_forward(
    c: StreamCluster, remote: int, binary: str = KUBECTL, transport: str = "websocket"
) -> Iterator[int]:
    local = free_port()
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig), **TRANSPORTS[transport]}
    proc = subprocess.Popen(
        [binary, "port-forward", "pod/web", "-n", "prod", f"{local}:{remote}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert "Forwarding from" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield local
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("binary", KUBECTLS)
def test_port_forward_http(cluster: StreamCluster, binary: str, transport: str) -> None:
    with port_forward(cluster, 8080, binary, transport) as local:
        assert _http_get(local) == b"hello from web:8080\n"
        assert _http_get(local) == b"hello from web:8080\n"  # a second connection on the same tunnel


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_raw_bytes_both_ways(cluster: StreamCluster, transport: str) -> None:
    payload = os.urandom(300_000)
    with (
        port_forward(cluster, 9090, transport=transport) as local,
        socket.create_connection(("127.0.0.1", local), timeout=10) as s,
    ):
        got = bytearray()

        def reader() -> None:
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        s.sendall(payload)
        t.join(20)
        assert bytes(got) == payload


def test_port_forward_undeclared_port_reports_error(cluster: StreamCluster) -> None:
    with port_forward(cluster, 7777) as local:
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(b"x")
            s.settimeout(10)
            # The pod side refused: kubectl closes the local connection. Whether the kernel sends FIN or
            # RST depends on whether kubectl had read our "x" before closing, so both count as closed;
            # a timeout (the connection left open) fails.
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass


# ---------------------------------------------------------------------------------------------------
# Other clients: kubernetes Python client (v4.channel.k8s.io), websockets (base64, port-forward v4)
# ---------------------------------------------------------------------------------------------------
def test_kubernetes_python_client_exec(cluster: StreamCluster) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    cfg = client.Configuration()
    cfg.host = cluster.url
    cfg.api_key = {"authorization": "Bearer t"}
    core = client.CoreV1Api(client.ApiClient(cfg))
    out = stream(
        core.connect_get_namespaced_pod_exec,
        "web",
        "prod",
        command=["sh", "-c", "echo from-python; echo oops >&2"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert "from-python" in out
    resp = stream(
        core.connect_get_namespaced_pod_exec,
        "web",
        "prod",
        command=["sh", "-c", "exit 9"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _preload_content=False,
    )
    resp.run_forever(timeout=10)
    assert resp.returncode == 9  # decoded from the v4 JSON Status on channel 3


def _ws_url(c: StreamCluster, path: str) -> str:
    return c.url.replace("http://", "ws://") + path


def test_websockets_base64_exec(cluster: StreamCluster) -> None:
    async def go() -> tuple[str | None, list[tuple[str, bytes]]]:
        url = _ws_url(
            cluster,
            "/api/v1/namespaces/prod/pods/web/exec?command=cat&stdin=true&stdout=true&stderr=true",
        )
        frames: list[tuple[str, bytes]] = []
        async with websockets.connect(
            url, subprotocols=[websockets.Subprotocol("v4.base64.channel.k8s.io")]
        ) as ws:
            await ws.send("0" + base64.b64encode(b"ping\n").decode())
            async for msg in ws:
                assert isinstance(msg, str)  # base64 protocols use text frames
                frames.append((msg[0], base64.b64decode(msg[1:])))
                if msg[0] == "1" and b"ping" in frames[-1][1]:
                    break  # v4 cannot half-close stdin; leaving ends the session (and kills cat)
            return ws.subprotocol, frames

    sub, frames = asyncio.run(go())
    assert sub == "v4.base64.channel.k8s.io"
    assert frames[0] == ("1", b"")  # the empty "streams are ready" frame on the lowest writable channel
    assert ("1", b"ping\n") in frames


def test_websockets_v5_status_and_close_signal(cluster: StreamCluster) -> None:
    async def go() -> dict[int, bytes]:
        url = _ws_url(
            cluster,
            "/api/v1/namespaces/prod/pods/web/exec?command=sh&command=-c&command=cat%3Bexit%204"
            "&stdin=true&stdout=true&stderr=true",
        )
        got: dict[int, bytes] = {}
        async with websockets.connect(url, subprotocols=[websockets.Subprotocol("v5.channel.k8s.io")]) as ws:
            await ws.send(b"\x00abc")
            await ws.send(b"\xff\x00")  # v5 CLOSE(stdin): cat sees EOF
            async for msg in ws:
                assert isinstance(msg, bytes)
                got[msg[0]] = got.get(msg[0], b"") + msg[1:]
        return got

    got = asyncio.run(go())
    assert got[1] == b"abc"
    status = json.loads(got[3])
    assert status == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 4",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "4"}]},
    }


def test_websockets_unsupported_subprotocol_gets_status(cluster: StreamCluster) -> None:
    async def go() -> Any:
        url = _ws_url(cluster, "/api/v1/namespaces/prod/pods/web/exec?command=true&stdout=true")
        with pytest.raises(websockets.InvalidStatus) as err:
            async with websockets.connect(url, subprotocols=[websockets.Subprotocol("v9.channel.k8s.io")]):
                pass
        return err.value.response

    resp = asyncio.run(go())
    assert resp.status_code == 400
    assert json.loads(resp.body)["kind"] == "Status"


def test_websockets_portforward_channel_protocol(cluster: StreamCluster) -> None:
    async def go() -> tuple[list[bytes], bytes]:
        url = _ws_url(cluster, "/api/v1/namespaces/prod/pods/web/portforward?ports=9090")
        async with websockets.connect(url, subprotocols=[websockets.Subprotocol("v4.channel.k8s.io")]) as ws:
            first = [await ws.recv(), await ws.recv()]
            await ws.send(b"\x00raw-bytes\x00\x01")
            # The echo may come back in more than one message (channel byte on each).
            echoed = b""
            async with asyncio.timeout(30):
                while len(echoed) < len(b"raw-bytes\x00\x01"):
                    message = bytes(await ws.recv())
                    assert message[:1] == b"\x00"
                    echoed += message[1:]
            return [bytes(f) for f in first], b"\x00" + echoed

    first, echoed = asyncio.run(go())
    port_le = struct.pack("<H", 9090)
    assert first == [b"\x00" + port_le, b"\x01" + port_le]
    assert echoed == b"\x00raw-bytes\x00\x01"


def test_spdy_tunnel_with_aiohttp_client(cluster: StreamCluster) -> None:
    """The SPDY/3.1 tunnel driven frame by frame (what kubectl does), incl. PING and a refused port."""
    import aiohttp

    async def go() -> tuple[bytes, bytes, int]:
        framer = spdy.SpdyFramer()
        url = cluster.url + "/api/v1/namespaces/prod/pods/web/portforward"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, protocols=["SPDY/3.1+portforward.k8s.io"]) as ws,
        ):
            assert ws.protocol == "SPDY/3.1+portforward.k8s.io"
            hdr = {"port": ["8080"], "requestid": ["0"]}
            await ws.send_bytes(
                framer.syn_stream(1, {"streamtype": ["error"], **hdr})
                + framer.data(1, fin=True)
                + framer.syn_stream(3, {"streamtype": ["data"], **hdr})
                + framer.data(3, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                + framer.ping(1)
            )
            bad = {"port": ["7777"], "requestid": ["1"]}
            await ws.send_bytes(
                framer.syn_stream(5, {"streamtype": ["error"], **bad})
                + framer.syn_stream(7, {"streamtype": ["data"], **bad})
            )
            data, errors, pings, fins = b"", b"", 0, set()
            while fins != {1, 3, 5, 7}:
                msg = await asyncio.wait_for(ws.receive(), 10)
                for f in framer.feed(msg.data):
                    if isinstance(f, spdy.DataFrame):
                        if f.stream_id == 3:
                            data += f.data
                        if f.stream_id == 5:
                            errors += f.data
                        if f.fin:
                            fins.add(f.stream_id)
                    elif f.type == spdy.PING:
                        pings += 1
            return data, errors, pings

    data, errors, pings = asyncio.run(go())
    assert data.endswith(b"\r\n\r\nhello from web:8080\n")
    assert b"dial tcp4 127.0.0.1:7777: connect: connection refused" in errors
    assert pings == 1


def test_spdy_framer_roundtrip() -> None:
    client, server = spdy.SpdyFramer(), spdy.SpdyFramer()
    wire = client.syn_stream(1, {"streamtype": ["data"], "port": ["80"]}) + client.syn_stream(
        3, {"streamtype": ["error"], "x": ["a", "b"]}, fin=True
    )
    frames = []
    for i in range(0, len(wire), 3):  # arbitrary message boundaries, as in the WebSocket tunnel
        frames += server.feed(wire[i : i + 3])
    assert isinstance(frames[0], spdy.ControlFrame) and frames[0].headers["port"] == ["80"]
    assert isinstance(frames[1], spdy.ControlFrame) and frames[1].headers["x"] == ["a", "b"] and frames[1].fin
    reply = client.feed(server.syn_reply(1) + server.data(1, b"x" * 10, fin=True) + server.rst_stream(3))
    assert [type(f).__name__ for f in reply] == ["ControlFrame", "DataFrame", "ControlFrame"]
    assert len(spdy.SPDY3_DICTIONARY) == 1423


# ---------------------------------------------------------------------------------------------------
# runtime lifecycle
# ---------------------------------------------------------------------------------------------------
def test_stop_pod_kills_every_process(cluster: StreamCluster) -> None:
    pod = _pod("tmp", [{"name": "t", "command": ["sh", "-c", "sleep 1000 & sleep 1000 & wait"]}])
    cluster.run(cluster.runtime.start_pod(pod))
    cluster.run(cluster.runtime.start_pod(pod))  # idempotent
    c = cluster.runtime.container("prod", "tmp", "t")
    assert c is not None and c.process is not None
    leader = c.process.pid
    time.sleep(0.5)

    def session_members() -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    if int(fields[3]) == leader and fields[0] != "Z":
                        out.append(int(entry))
        return out

    assert len(session_members()) >= 3
    cluster.run(cluster.runtime.stop_pod("prod", "tmp"))
    time.sleep(0.2)
    assert session_members() == []
    assert not cluster.runtime.pod_root("prod", "tmp").exists()


def test_recreated_pod_gets_a_fresh_root(cluster: StreamCluster) -> None:
    rt = cluster.runtime
    first = _pod("again", [{"name": "c"}])
    cluster.run(rt.start_pod(first))
    (rt.pod_root("prod", "again") / "tmp" / "old").write_text("x")
    second = _pod("again", [{"name": "c"}])
    second["metadata"]["uid"] = "uid-again-2"
    cluster.run(rt.start_pod(second))
    assert not (rt.pod_root("prod", "again") / "tmp" / "old").exists()
    assert "running" in rt.container_state("prod", "again", "c")
    cluster.run(rt.stop_pod("prod", "again"))


# ---------------------------------------------------------------------------------------------------
# Confinement: a pod reaches no host file outside its own directory (namespaces, proot, or nothing at all:
# then it fails closed). Each attack runs in every mode; modes that do not work on this host skip.
# ---------------------------------------------------------------------------------------------------
@dataclass
class Confined:
    cluster: StreamCluster
    mode: str
    host: Path  # host files a pod must neither read nor write
    secret: Path

    @property
    def confines(self) -> bool:
        return self.mode != "nothing"


@pytest.fixture(scope="module", params=["namespaces", "proot", "nothing"])
def confined(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Confined]:
    mode: str = request.param
    patch = pytest.MonkeyPatch()
    if mode == "nothing":
        patch.setenv("KUBEGATE_SANDBOX_PROOT", "0")  # proot hidden, user namespaces not asked for
        isolation = "proot"
    else:
        isolation = mode
        if choose_isolation(mode)[0] != mode:
            pytest.skip(f"{mode} cannot confine pods on this host")
    # World-readable and -writable on purpose: only confinement, not file permissions, may keep pods out
    # (a root sandbox runs namespaced pods as nobody).
    host = Path(tempfile.mkdtemp(prefix="kubegate-host-"))
    host.chmod(0o777)
    secret = host / "secret.txt"
    secret.write_text("host-only\n")
    secret.chmod(0o666)
    root = tmp_path_factory.mktemp(f"confined-{mode}")
    try:
        with _running_cluster(root, [_pod("box", [{"name": "box"}])], isolation) as c:
            yield Confined(c, mode, host, secret)
    finally:
        patch.undo()
        shutil.rmtree(host, ignore_errors=True)


def _refused(r: subprocess.CompletedProcess[str]) -> None:
    """What every pod command gets when nothing can confine it: one line saying what to install."""
    assert r.returncode != 0
    assert r.stdout == ""
    assert "sandbox pods need isolation from the host" in r.stderr
    assert "install proot" in r.stderr


def test_exec_cat_etc_passwd_shows_the_pods_own(confined: Confined) -> None:
    r = kubectl(confined.cluster, "exec", "box", "--", "cat", "/etc/passwd")
    assert Path("/etc/passwd").read_text() not in r.stdout
    if not confined.confines:
        _refused(r)
        return
    assert r.returncode == 0, r.stderr
    assert r.stdout == POD_ETC["passwd"]


def test_absolute_dotdot_symlink_and_proc_paths_stay_in_the_pod(confined: Confined) -> None:
    host, secret = confined.host, confined.secret
    # A link the pod's tree already holds (left by anyone) pointing at the host directory.
    os.symlink(host, confined.cluster.runtime.pod_root("prod", "box") / "tmp" / "planted")
    script = "; ".join(
        [
            f"cat {secret}",
            f"cat ../../../../../../..{secret}",
            f"cd /tmp && cat ../../../../../..{secret}",
            "ln -s / /tmp/slash",
            f"cat /tmp/slash{secret}",
            "ln -s ../../../../../../../.. /tmp/up",
            f"cat /tmp/up{secret}",
            "cat /tmp/planted/secret.txt",
            f"cat /proc/1/root{secret}",
            f"cat /proc/self/root{secret}",
            f"echo pwned > {host}/written",
            f"echo pwned > /tmp/up{host}/written-up",
            "echo pwned > /tmp/planted/written-planted",
            "echo done",
        ]
    )
    r = kubectl(confined.cluster, "exec", "box", "--", "sh", "-c", script)
    assert "host-only" not in r.stdout + r.stderr
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt"]
    if not confined.confines:
        _refused(r)
        return
    assert r.stdout.endswith("done\n"), r.stderr  # the script ran; every attempt just missed


def test_kubectl_cp_cannot_leave_the_pod(confined: Confined, tmp_path: Path) -> None:
    c, host = confined.cluster, confined.host
    src = tmp_path / "payload.txt"
    src.write_text("payload\n")
    for remote in (
        f"{host}/cp-abs.txt",
        f"../../../../../../..{host}/cp-dotdot.txt",
        "/tmp/../../../cp-up.txt",
    ):
        kubectl(c, "cp", str(src), f"prod/box:{remote}")
    back = tmp_path / "stolen.txt"
    r = kubectl(c, "cp", f"prod/box:{confined.secret}", str(back))
    assert not back.exists() or "host-only" not in back.read_text()
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt"]
    if not confined.confines:
        _refused(r)
        return
    # What kubectl cp does to absolute paths in a container: they are the pod's.
    r = kubectl(c, "cp", str(src), "prod/box:/tmp/in-pod.txt")
    assert r.returncode == 0, r.stderr
    assert (c.runtime.pod_root("prod", "box") / "tmp" / "in-pod.txt").read_text() == "payload\n"
    assert (c.runtime.pod_root("prod", "box") / "cp-up.txt").read_text() == "payload\n"  # ".." stops at /


def test_containers_fail_closed_without_confinement(confined: Confined) -> None:
    state = confined.cluster.runtime.container_state("prod", "box", "box")
    if confined.confines:
        assert "running" in state
        return
    assert state["waiting"]["reason"] == "RunContainerError"
    assert "install proot" in state["waiting"]["message"]


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "pod"
    (root / "tmp" / "deep").mkdir(parents=True)
    (root / "tmp" / "abs").symlink_to("/etc")  # absolute: the pod's /etc, not the host's
    (root / "tmp" / "up").symlink_to("../../../../../..")
    (root / "tmp" / "loop").symlink_to("loop")
    (root / "tmp" / "deep" / "rel").symlink_to("../abs")
    assert resolve_in_root(root, "/etc/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(root, "../../../../etc/passwd", "/tmp") == str(root / "etc/passwd")
    assert resolve_in_root(root, "/tmp/abs/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(root, "/tmp/deep/rel/shadow") == str(root / "etc/shadow")
    assert resolve_in_root(root, "/tmp/up/etc/passwd") == str(root / "etc/passwd")
    assert not os.path.exists(resolve_in_root(root, "/tmp/loop"))
    # The image (programs) is the host's, read-only inside the pod.
    assert resolve_in_root(root, "/usr/bin/env") == "/usr/bin/env"
    assert resolve_in_root(root, "/tmp/up/usr/bin/../bin/env") == "/usr/bin/env"


def test_isolation_is_chosen_and_proot_can_be_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_isolation("no-such-isolation") == (None, None)
    monkeypatch.setenv("KUBEGATE_SANDBOX_PROOT", "0")
    assert choose_isolation("proot") == (None, None)
    monkeypatch.delenv("KUBEGATE_SANDBOX_PROOT")
    proot = shutil.which("proot")
    assert choose_isolation("proot") == (("proot", proot) if proot else (None, None))
    assert choose_isolation("auto")[0] in {choose_isolation("namespaces")[0] or "proot", None}


# ---------------------------------------------------------------------------------------------------
# The same handlers behind the real sandbox server (TLS, bearer token, routing): shared `sandbox` fixture
# ---------------------------------------------------------------------------------------------------
def _sb_kubectl(sandbox: Any, *args: str, binary: str = KUBECTL, input: str | None = None) -> Any:
    env = {**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run(
        [binary, *args], input=input, capture_output=True, text=True, timeout=60, env=env, check=False
    )


@needs_isolation
@pytest.mark.parametrize("binary", KUBECTLS)
def test_sandbox_server_exec_cp_and_logs(sandbox: Any, binary: str, tmp_path: Path) -> None:
    r = _sb_kubectl(sandbox, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo hi; echo $DB_PASSWORD >&2")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    assert r.stderr.strip()  # the secret resolved through the store into the container env
    r = _sb_kubectl(sandbox, "exec", "web", "-n", "prod", "--", "sh", "-c", "exit 3", binary=binary)
    assert r.returncode == 3
    r = _sb_kubectl(sandbox, "exec", "-i", "web", "-n", "prod", "--", "cat", input="piped\n", binary=binary)
    assert r.stdout == "piped\n"
    src = tmp_path / "f.txt"
    src.write_text("copied through the sandbox server\n")
    r = _sb_kubectl(sandbox, "cp", str(src), "prod/web:/tmp/f.txt", binary=binary)
    assert r.returncode == 0, r.stderr
    r = _sb_kubectl(sandbox, "exec", "web", "-n", "prod", "--", "cat", "/tmp/f.txt", binary=binary)
    assert r.stdout == src.read_text()
    r = _sb_kubectl(sandbox, "logs", "web", "-n", "prod", "--tail=1", binary=binary)
    assert "request" in r.stdout and r.stdout.count("\n") == 1


@needs_isolation
def test_sandbox_server_port_forward_and_follow(sandbox: Any) -> None:
    local = free_port()
    env = {**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)}
    pf = subprocess.Popen(
        [KUBECTL, "port-forward", "pod/web", "-n", "prod", f"{local}:8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    logs = subprocess.Popen(
        [KUBECTL, "logs", "-f", "--tail=0", "web", "-n", "prod"], stdout=subprocess.PIPE, env=env
    )
    try:
        assert pf.stdout is not None and "Forwarding from" in pf.stdout.readline()
        assert _http_get(local) == b"hello from web:8080\n"
        assert _http_get(local) == b"hello from web:8080\n"
        assert logs.stdout is not None
        assert b"request" in logs.stdout.readline()  # a line written after the follow started
    finally:
        for p in (pf, logs):
            p.terminate()
            p.wait(5)


@needs_isolation
def test_sandbox_server_python_client_exec(sandbox: Any) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    cfg = client.Configuration()
    cfg.host = sandbox.url
    cfg.ssl_ca_cert = str(sandbox.ca_file)
    cfg.api_key = {"authorization": "Bearer " + sandbox.token}
    core = client.CoreV1Api(client.ApiClient(cfg))
    out = stream(
        core.connect_get_namespaced_pod_exec,
        "web",
        "prod",
        command=["sh", "-c", "echo over-tls"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert out.strip() == "over-tls"
