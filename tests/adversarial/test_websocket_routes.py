"""A WebSocket upgrade on a route that is not a pod's exec, attach or port-forward (red team, 2026-12-08).

The API server answers such an upgrade in two ways, and both used to carry Secret values past masking:

- it does not upgrade a plain GET (an object, a list, a log without streaming): it answers 200 with the
  body, and the gateway relayed that answer as the API server's "refusal" of the handshake, unmasked;
- it does upgrade a watch (`WatchServer.HandleWS`, one event per message), a streamed object such as a
  log (`responsewriters.StreamObject`, `binary.k8s.io` / `base64.binary.k8s.io`) and the proxy
  subresources; the gateway then relayed every frame, since only exec/attach output is masked per frame.

Now a masked connection refuses every other WebSocket before anything is sent upstream, and no connection
passes on a handshake answer that is not an error (502). The sandbox answers such upgrades without
upgrading, as the API server does for a plain GET; a small stand-in API server below upgrades as the Go
code does. An unmasked connection still relays a watch over a WebSocket (web consoles use them).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import ThreadedApp

from kubegate.sandbox.seed import DB_PASSWORD

ALICE = GATEWAY_USERS["alice"][1]
PASSWORD_B64 = base64.b64encode(DB_PASSWORD.encode()).decode()
REFUSAL = "a WebSocket is served for a pod's exec, attach and port-forward only"
SECRET_EVENT = {"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "db-credentials", "namespace": "prod"}, "type": "Opaque",
                "data": {"password": PASSWORD_B64}}}  # fmt: skip
LOG_LINE = f"connecting with PASSWORD={DB_PASSWORD}\n"


def handshake(gw: Gateway, connection: str, path: str, protocol: str = "") -> tuple[int, bytes]:
    """A WebSocket handshake as a browser or websocat sends it; the status and body of an answer that is not
    101 (aiohttp's client drops the body of a refused handshake)."""
    host, port = gw.url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(gw.ca_file)), timeout=15
    )
    headers = {
        "Authorization": f"Bearer {ALICE}",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **({"Sec-WebSocket-Protocol": protocol} if protocol else {}),
    }
    try:
        conn.request("GET", f"/k8s/{connection}{path}", headers=headers)
        response = conn.getresponse()
        return response.status, response.read() if response.status != 101 else b""
    finally:
        conn.close()


def status_message(body: bytes) -> str:
    status = json.loads(body)
    assert status["kind"] == "Status"
    return str(status["message"])


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    """`masked` (masking on) and `sandbox` (no masking), both to the sandbox."""
    directory = tmp_path_factory.mktemp("gw-websocket-routes")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    config["connections"]["masked"] = {"upstream": dict(plain["upstream"]),
                                       "plugins": {"static-tokens": plain["plugins"]["static-tokens"], "masking": {}}}  # fmt: skip
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


ROUTES = [
    "/api/v1/namespaces/prod/secrets/db-credentials",
    "/api/v1/namespaces/prod/secrets",
    "/api/v1/namespaces/prod/secrets?watch=1&timeoutSeconds=2",
    "/api/v1/namespaces/prod/pods/web/log?tailLines=5",
    "/api/v1/namespaces/prod/pods/web/proxy/",
]


@pytest.mark.parametrize("path", ROUTES)
def test_a_masked_connection_refuses_other_websockets_before_upstream(gw, sandbox, path):
    since = sandbox.requests_log()[-1]["id"]
    status, body = handshake(gw, "masked", path)
    assert status == 403, body
    assert REFUSAL in status_message(body)
    assert PASSWORD_B64.encode() not in body and DB_PASSWORD.encode() not in body
    assert [r for r in sandbox.requests_log(since) if "/prod/" in r["path"]] == []


def test_exec_still_opens_on_a_masked_connection(gw):
    status, _ = handshake(gw, "masked", "/api/v1/namespaces/prod/pods/web/exec?command=true&stdout=1",
                          "v5.channel.k8s.io")  # fmt: skip
    assert status == 101


@pytest.mark.parametrize("path", ROUTES[:2])
def test_a_handshake_answered_as_a_plain_request_is_never_passed_on(gw, path):
    # The sandbox, like the API server, answers a GET that asks to upgrade with the object itself (200). On
    # a connection without masking that answer went out too, past every response hook.
    status, body = handshake(gw, "sandbox", path)
    assert status == 502, body
    assert "answered the WebSocket upgrade with HTTP 200 instead of switching protocols" in status_message(
        body
    )
    assert PASSWORD_B64.encode() not in body


# -- An API server that upgrades watches and logs, as the Go code does (the sandbox does not).


class UpgradingApiServer(ThreadedApp):
    """Serves a watch of Secrets (one JSON event per text message) and a pod's log (`binary.k8s.io` or
    `base64.binary.k8s.io`) over a WebSocket, and counts the requests it got."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("GET", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        if request.path.endswith("/secrets") and request.query.get("watch"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str(json.dumps(SECRET_EVENT))
            await ws.close()
            return ws
        if request.path.endswith("/pods/web/log"):
            ws = web.WebSocketResponse(protocols=("binary.k8s.io", "base64.binary.k8s.io"))
            await ws.prepare(request)
            if ws.ws_protocol == "base64.binary.k8s.io":
                await ws.send_str(base64.b64encode(LOG_LINE.encode()).decode())
            else:
                await ws.send_bytes(LOG_LINE.encode())
            await ws.close()
            return ws
        return web.json_response({"kind": "Status", "code": 404}, status=404)


@pytest.fixture(scope="module")
def upgrading(sandbox, tmp_path_factory) -> Iterator[tuple[Gateway, UpgradingApiServer]]:
    api = UpgradingApiServer()
    directory = tmp_path_factory.mktemp("gw-websocket-upgrading")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    upstream = {"server": api.url, "token_file": plain["upstream"]["token_file"]}
    tokens = plain["plugins"]["static-tokens"]
    config["connections"] = {
        "masked": {"upstream": upstream, "plugins": {"static-tokens": tokens,
                                                     "masking": {"known_values": {"enabled": False}}}},
        "plain": {"upstream": upstream, "plugins": {"static-tokens": tokens}},
    }  # fmt: skip
    gateway = start_gateway(directory, config)
    yield gateway, api
    stop_process(gateway.process)
    api.stop()


async def messages(gw: Gateway, connection: str, path: str, protocol: str = "") -> list[Any]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    out: list[Any] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{gw.url}/k8s/{connection}{path}", ssl=context,
                                      protocols=(protocol,) if protocol else (),
                                      headers={"Authorization": f"Bearer {ALICE}"}) as ws:  # fmt: skip
            async for message in ws:
                if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    out.append(message.data)
    return out


@pytest.mark.parametrize(
    ("path", "protocol"),
    [
        ("/api/v1/namespaces/prod/secrets?watch=1", ""),
        ("/api/v1/namespaces/prod/pods/web/log?follow=true", "binary.k8s.io"),
        ("/api/v1/namespaces/prod/pods/web/log?follow=true", "base64.binary.k8s.io"),
    ],
)
def test_a_masked_connection_does_not_open_what_the_api_server_would_upgrade(upgrading, path, protocol):
    gw, api = upgrading
    # The control: through the connection without masking, the stand-in's frames carry the value.
    relayed = asyncio.run(messages(gw, "plain", path, protocol))
    clear = b"".join(m.encode() if isinstance(m, str) else m for m in relayed)
    assert (
        PASSWORD_B64.encode() in clear
        or base64.b64encode(LOG_LINE.encode()) in clear
        or LOG_LINE.encode() in clear
    )
    before = len(api.requests)
    status, body = handshake(gw, "masked", path, protocol)
    assert status == 403 and REFUSAL in status_message(body)
    assert len(api.requests) == before  # refused before anything went upstream


def test_the_frame_masker_drops_what_it_does_not_mask():
    # Defence in depth behind the refusal: a session of any other route never gets a frame out unread.
    from types import SimpleNamespace

    from kubegate.core.flow import Frame, FrameDirection
    from kubegate.plugins.masking import Masking, MaskingSettings, kubegate_stream_frame

    masking = Masking(MaskingSettings())
    session = SimpleNamespace(subprotocol="", state={})
    for resource, subresource, dropped in [("secrets", "", True), ("pods", "log", True), ("pods", "proxy", True),
                                           ("nodes", "proxy", True), ("pods", "portforward", False)]:  # fmt: skip
        flow = SimpleNamespace(connection=SimpleNamespace(state={"masking": masking}), state={},
                               attributes=SimpleNamespace(api_group="", resource=resource, subresource=subresource))  # fmt: skip
        frame = Frame(FrameDirection.UPSTREAM_TO_CLIENT, json.dumps(SECRET_EVENT).encode(), text=True)
        kubegate_stream_frame(flow, session, frame)
        assert frame.drop is dropped, (resource, subresource)
