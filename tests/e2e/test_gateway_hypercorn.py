"""`server: hypercorn` — the same application on Hypercorn (which adds HTTP/2, negotiated by kubectl)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import ssl
import urllib.request

import pytest
from conftest import GATEWAY_USERS, free_port, gateway_config, start_gateway, stop_process
from kubetest import Background, run_kubectl, wait_for_async

# A bearer token of 200 KB (a SAML- or group-laden token can be large): the API server takes a head of up to
# 1 MiB, over HTTP/1.1 and HTTP/2 alike (Go's MaxHeaderBytes), and so must the gateway.
LONG_TOKEN = secrets.token_urlsafe(150_000)


@pytest.fixture(scope="module")
def hypercorn_gateway(sandbox, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hypercorn")
    config = gateway_config(sandbox, directory, free_port())
    config["server"] = "hypercorn"
    config["connections"]["sandbox"]["plugins"]["static-tokens"]["tokens"].append(
        {"user": "long-token-user", "sha256": hashlib.sha256(LONG_TOKEN.encode()).hexdigest()}
    )
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def test_kubectl_over_http2(hypercorn_gateway):
    kubeconfig = hypercorn_gateway.kubeconfig("alice")
    whoami = run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", check=True)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == "alice"
    pods = run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True)
    assert "web" in pods.stdout


@pytest.mark.needs_pods
def test_exec_and_port_forward(hypercorn_gateway):
    kubeconfig = hypercorn_gateway.kubeconfig("alice")
    proc = run_kubectl(kubeconfig, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo hi; exit 3")
    assert proc.returncode == 3 and proc.stdout == "hi\n"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = Background(["kubectl", "port-forward", "pod/web", "-n", "prod", f"{port}:8080"], kubeconfig)
    try:
        forward.read_until(r"Forwarding from 127\.0\.0\.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert b"hello from web:8080" in resp.read()
    finally:
        forward.stop()


@pytest.mark.needs_pods
async def test_backpressure_both_ways(hypercorn_gateway):
    from e2e import test_gateway_streams as streams

    await streams.test_slow_reading_exec_client_does_not_grow_gateway_memory(hypercorn_gateway)
    await streams.test_client_flooding_stdin_does_not_grow_gateway_memory(hypercorn_gateway)


def test_a_head_as_large_as_the_api_server_takes_over_http2(hypercorn_gateway):
    kubeconfig = hypercorn_gateway.kubeconfig("alice", token=LONG_TOKEN)
    whoami = run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", check=True)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == "long-token-user"


def test_a_head_as_large_as_the_api_server_takes_over_http1(hypercorn_gateway):
    request = urllib.request.Request(f"{hypercorn_gateway.connection_url('sandbox')}/version",
                                     headers={"Authorization": f"Bearer {LONG_TOKEN}"})  # fmt: skip
    context = ssl.create_default_context(cafile=str(hypercorn_gateway.ca_file))
    context.set_alpn_protocols(["http/1.1"])
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["gitVersion"]


class SilentUpstream:
    """An API server that reads requests and never answers: each request holds its connection open until
    the gateway closes it. Counts requests and connections still open."""

    def __init__(self) -> None:
        self.requests = 0
        self.open = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await reader.read()  # until the gateway closes the connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def rapid_reset(gateway, path: str, token: str, streams: int) -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, `streams` times, on one connection."""
    import h2.config
    import h2.connection

    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    context.set_alpn_protocols(["h2"])
    port = int(gateway.url.rsplit(":", 1)[1])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as s:
        assert s.selected_alpn_protocol() == "h2"
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        for _ in range(streams):
            stream = connection.get_next_available_stream_id()
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1"),
                       (":path", path), ("authorization", f"Bearer {token}")]  # fmt: skip
            connection.send_headers(stream, headers, end_stream=True)
            connection.reset_stream(stream)
            s.sendall(connection.data_to_send())


async def test_reset_streams_cancel_their_upstream_requests(sandbox, tmp_path):
    """Streams reset right after their HEADERS kept their upstream requests running to the end (2,700
    streams made 2,296 concurrent upstream requests): Hypercorn only queues `http.disconnect` on a reset.
    Now each upstream request is cancelled (its connection closed) while the API server has not answered,
    as Go cancels a handler's context on RST_STREAM."""
    upstream = SilentUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    silent = {
        "upstream": {
            "server": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
            "token_file": str(tmp_path / "upstream-token"),
        },
    }
    config = gateway_config(sandbox, tmp_path, free_port(), extra_connections={"silent": silent})
    silent["plugins"] = config["connections"]["sandbox"]["plugins"]
    config["server"] = "hypercorn"
    config["limits"]["upstream_response_timeout_seconds"] = 300  # only the client's leaving ends a request
    gw = await asyncio.to_thread(start_gateway, tmp_path, config)
    try:
        alice = GATEWAY_USERS["alice"][1]
        await asyncio.to_thread(rapid_reset, gw, "/k8s/silent/api/v1/namespaces/dev/pods", alice, 300)
        await wait_for_async(
            lambda: upstream.requests > 0, "reset streams to reach the API server", timeout=30
        )
        await wait_for_async(lambda: upstream.open == 0, "every upstream request to be cancelled", timeout=30)
    finally:
        stop_process(gw.process)
        server.close()
