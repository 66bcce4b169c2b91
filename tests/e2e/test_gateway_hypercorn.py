"""`server: hypercorn` — the same application on Hypercorn (which adds HTTP/2, negotiated by kubectl)."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import ssl
import urllib.request

import pytest
from conftest import free_port, gateway_config, start_gateway, stop_process
from kubetest import Background, run_kubectl

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
