"""exec / attach / port-forward and long streams through the gateway, with non-kubectl clients too."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import time
from urllib.parse import urlencode

import psutil
import pytest
import websockets
from conftest import GATEWAY_USERS
from kubetest import Background, run_kubectl
from websockets.asyncio.client import connect

ALICE = GATEWAY_USERS["alice"][1]
MB = 1024 * 1024


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("https://", "wss://") + path


def client_ssl(gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gateway.ca_file))


def kube_client(gateway):
    from kubernetes import client

    config = client.Configuration()
    config.host = gateway.connection_url("sandbox")
    config.ssl_ca_cert = str(gateway.ca_file)
    config.api_key = {"authorization": f"Bearer {ALICE}"}
    return client.CoreV1Api(client.ApiClient(config))


@pytest.mark.needs_pods
def test_python_client_rest_and_exec_over_v4(gateway):
    """The official client lists, and execs over v4.channel.k8s.io (its websocket-client transport)."""
    from kubernetes.stream import stream

    api = kube_client(gateway)
    pods = api.list_namespaced_pod("prod")
    assert "web" in [p.metadata.name for p in pods.items]
    out = stream(
        api.connect_get_namespaced_pod_exec,
        "web",
        "prod",
        command=["sh", "-c", "echo from-python-client"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert "from-python-client" in out


def test_python_client_watch(gateway):
    from kubernetes import watch

    api = kube_client(gateway)
    events = []
    for event in watch.Watch().stream(api.list_namespaced_pod, "prod", timeout_seconds=2):
        events.append((event["type"], event["object"].metadata.name))
    assert ("ADDED", "web") in events


@pytest.mark.needs_pods
async def test_raw_websocket_base64_channel(gateway):
    """A non-Go client offering v4.base64.channel.k8s.io gets text frames with base64 payloads."""
    path = "/k8s/sandbox/api/v1/namespaces/prod/pods/web/exec?command=echo&command=b64-ok&stdout=true&stderr=true"
    async with connect(
        ws_url(gateway, path),
        subprotocols=["v4.base64.channel.k8s.io"],
        additional_headers={"Authorization": f"Bearer {ALICE}"},
        ssl=client_ssl(gateway),
    ) as ws:
        assert ws.subprotocol == "v4.base64.channel.k8s.io"
        stdout, status = b"", None
        async for message in ws:
            assert isinstance(message, str)
            channel, payload = message[0], base64.b64decode(message[1:])
            if channel == "1":
                stdout += payload
            elif channel == "3":
                status = json.loads(payload)
    assert stdout == b"b64-ok\n"
    assert status["status"] == "Success"


async def test_websocket_without_token_is_refused_before_upgrade(gateway):
    path = "/k8s/sandbox/api/v1/namespaces/prod/pods/web/exec?command=true&stdout=true"
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with connect(
            ws_url(gateway, path), subprotocols=["v5.channel.k8s.io"], ssl=client_ssl(gateway)
        ):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["reason"] == "Unauthorized"


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.needs_pods
async def test_slow_reading_exec_client_does_not_grow_gateway_memory(gateway):
    """The pod writes as fast as it can; the client reads nothing for a while. Backpressure must stop the
    gateway reading upstream, so its memory stays flat instead of buffering the stream."""
    query = urlencode(
        [("command", "sh"), ("command", "-c"), ("command", "exec cat /dev/zero"), ("stdout", "true")]
    )
    path = f"/k8s/sandbox/api/v1/namespaces/prod/pods/web/exec?{query}"
    before = rss(gateway.process.pid)
    async with connect(
        ws_url(gateway, path),
        subprotocols=["v5.channel.k8s.io"],
        additional_headers={"Authorization": f"Bearer {ALICE}"},
        ssl=client_ssl(gateway),
        max_queue=2,
        max_size=None,
        compression=None,
    ) as ws:
        first = await ws.recv()
        assert first[0] == 1  # stdout
        await asyncio.sleep(5)  # stop reading; upstream would produce gigabytes meanwhile
        grown = rss(gateway.process.pid) - before
        assert grown < 64 * MB, f"gateway grew by {grown / MB:.0f} MB while the client was not reading"
        received = 0
        deadline = time.monotonic() + 10
        while received < 20 * MB and time.monotonic() < deadline:
            received += len(await ws.recv())
        assert received >= 20 * MB  # the stream still flows once the client reads again


@pytest.mark.needs_pods
async def test_client_flooding_stdin_does_not_grow_gateway_memory(gateway):
    """The pod never reads its stdin; the client sends as fast as the gateway accepts."""
    query = urlencode([("command", "sleep"), ("command", "60"), ("stdin", "true"), ("stdout", "true")])
    path = f"/k8s/sandbox/api/v1/namespaces/prod/pods/web/exec?{query}"
    before = rss(gateway.process.pid)
    async with connect(
        ws_url(gateway, path),
        subprotocols=["v5.channel.k8s.io"],
        additional_headers={"Authorization": f"Bearer {ALICE}"},
        ssl=client_ssl(gateway),
        write_limit=64 * 1024,
        compression=None,  # compressed, 2 GB of the same byte would be a few MB on the wire
    ) as ws:
        frame = b"\x00" + os.urandom(256 * 1024)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while sent < 2048 * MB:
                await ws.send(frame)
                sent += len(frame)
                await asyncio.sleep(0)  # let the clock run even if sends never block

        task = asyncio.ensure_future(flood())
        await asyncio.sleep(5)
        task.cancel()
        grown = rss(gateway.process.pid) - before
        assert sent < 1024 * MB, "sends never blocked: nothing pushed back"
        assert grown < 64 * MB, f"gateway grew by {grown / MB:.0f} MB buffering stdin"


@pytest.mark.needs_pods
def test_attach_through_the_gateway(gateway):
    """`kubectl attach` streams the container's output (the pod prints a line every second)."""
    attach = Background(["kubectl", "attach", "web", "-n", "prod"], gateway.kubeconfig("alice"))
    try:
        attach.read_until(r"postgres://", timeout=20)
        assert attach.alive()
    finally:
        attach.stop()


@pytest.mark.needs_pods
@pytest.mark.slow
def test_watch_and_logs_follow_stay_open_past_90_seconds(gateway):
    """No response timeout anywhere on the path: a quiet watch and `logs -f` outlive 90 s."""
    kubeconfig = gateway.kubeconfig("alice")
    watch = Background(["kubectl", "get", "configmaps", "-n", "prod", "-w"], kubeconfig)
    logs = Background(["kubectl", "logs", "-f", "web", "-n", "prod", "--tail=1"], kubeconfig)
    try:
        watch.read_until(r"app-config")
        logs.read_until(r"postgres://")
        time.sleep(95)
        assert watch.alive() and logs.alive()
        run_kubectl(
            kubeconfig, "create", "configmap", "after-95s", "-n", "prod", "--from-literal=a=b", check=True
        )
        watch.read_until(r"after-95s")
        logs.read_until(r"postgres://", timeout=10)
    finally:
        watch.stop()
        logs.stop()
        run_kubectl(kubeconfig, "delete", "configmap", "after-95s", "-n", "prod")


async def test_many_concurrent_watches_all_stream(gateway):
    """Each watch holds an upstream connection for as long as it runs: 150 at once must all get their
    events (a connection-pool cap would make watch 101 onwards wait and fail)."""
    import aiohttp

    url = f"{gateway.connection_url('sandbox')}/api/v1/namespaces/prod/configmaps?watch=true"
    headers = {"Authorization": f"Bearer {ALICE}"}
    connector = aiohttp.TCPConnector(limit=0, ssl=client_ssl(gateway))
    async with aiohttp.ClientSession(connector=connector) as session:
        all_open = asyncio.Barrier(150)

        async def first_event(_: int) -> dict:
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
                event = json.loads(await resp.content.readline())
                await all_open.wait()  # every watch stays open until all 150 have streamed
                return event

        async with asyncio.timeout(60):
            events = await asyncio.gather(*(first_event(i) for i in range(150)))
    assert all(event["type"] == "ADDED" for event in events)


def test_python_client_port_forward_over_v4_channels(gateway):
    """Non-Go clients port-forward with `?ports=` over v4.channel.k8s.io; the gateway relays it unchanged."""
    from kubernetes.stream import portforward

    api = kube_client(gateway)
    forward = portforward(api.connect_get_namespaced_pod_portforward, "web", "prod", ports="8080")
    try:
        sock = forward.socket(8080)
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        received = b""
        while b"hello from web:8080" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        assert b"hello from web:8080" in received
        sock.close()
        assert forward.error(8080) is None
    finally:
        forward.close()


@pytest.mark.needs_pods
def test_kubectl_run_interactive_attaches_through_the_gateway(gateway):
    """`kubectl run -it` creates a pod and attaches to its tty (attach with stdin, a pty, resize)."""
    from kubetest import PtySession

    kubeconfig = gateway.kubeconfig("alice")
    name = f"shell-{os.getpid()}"
    session = PtySession(
        [
            "kubectl",
            "run",
            name,
            "-n",
            "dev",
            "--image=busybox",
            "-it",
            "--restart=Never",
            "--command",
            "--",
            "sh",
        ],
        kubeconfig,
    )
    try:
        session.send("\n")
        session.send("echo $((7*6))\n")
        session.expect("42", timeout=30)
        session.send("exit 0\n")
        assert session.wait(20) == 0
    finally:
        session.close()
        run_kubectl(kubeconfig, "delete", "pod", name, "-n", "dev", "--wait=false")
