"""Bypass classes the gateway already held before the adversarial corpus existed, tried harder: smuggled
identity headers, second credentials, token forms. Each test sends crafted requests with a valid developer
token (alice, group `developers`) and asserts on what the sandbox cluster received, not only on the answer."""

from __future__ import annotations

import base64
import json
import ssl

import aiohttp
import pytest
from conftest import GATEWAY_USERS
from websockets.asyncio.client import connect
from yarl import URL

ALICE = GATEWAY_USERS["alice"][1]
PODS = "/k8s/sandbox/api/v1/namespaces/prod/pods"


def client_ssl(gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gateway.ca_file))


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


async def send(gateway, path: str, headers: list[tuple[str, str]], method: str = "GET") -> tuple[int, bytes]:
    """Headers as a list, so that repeated and oddly cased names go out exactly as written."""
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
        url = URL(f"{gateway.url}{path}", encoded=True)
        async with session.request(method, url, headers=headers, ssl=client_ssl(gateway)) as resp:
            return resp.status, await resp.read()


def assert_arrived_as_alice_only(records: list[dict]) -> None:
    assert records, "the sandbox saw nothing"
    for record in records:
        assert record["impersonate_user"] == "alice"
        assert record["impersonate_groups"] == ["developers"]
        assert not record["impersonate_uid"] and not record["impersonate_extra"]
        assert record["user"] == "alice" and "system:masters" not in record["groups"]
        names = set(record["headers"])
        assert not {n for n in names if n.startswith(("x-remote-", "proxy-"))}, names
        assert len(record["headers"]["authorization"]) == 1


SMUGGLED = [
    [("iMPERSONATE-uSER", "admin")],
    [("Impersonate-Group", "system:masters")],
    [("Impersonate-Uid", "0"), ("Impersonate-Extra-Scopes", "cluster-admin")],
    [("Impersonate-Extra-%41cme", "x")],
    # Listed as hop-by-hop, as if a proxy in between should drop it and a later hop read it.
    [("Connection", "keep-alive, Impersonate-User"), ("Impersonate-User", "admin")],
    # The API server's front-proxy authenticator headers (believed when the gateway's credential is a
    # front-proxy client certificate).
    [("X-Remote-User", "admin"), ("X-Remote-Group", "system:masters"), ("X-Remote-Extra-Scopes", "all")],
    [("X-Remote-Uid", "0")],
    [("Proxy-Authorization", "Bearer someone-elses-token")],
]


@pytest.mark.parametrize("extra", SMUGGLED, ids=lambda h: h[-1][0])
async def test_identity_headers_never_pass(gateway, sandbox, extra):
    since = last_id(sandbox)
    status, body = await send(gateway, PODS, [("Authorization", f"Bearer {ALICE}"), *extra])
    assert status == 200, body
    assert_arrived_as_alice_only(sandbox.requests_log(since))


async def test_a_second_authorization_header_is_refused(gateway, sandbox):
    """Two credentials: which one a front load balancer, the gateway and a plugin read could differ — refused."""
    since = last_id(sandbox)
    status, body = await send(
        gateway, PODS, [("Authorization", f"Bearer {ALICE}"), ("Authorization", "Bearer other-token")]
    )
    assert status == 401 and json.loads(body)["kind"] == "Status"
    assert sandbox.requests_log(since) == []


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        (f"bearer {ALICE}", True),  # the scheme is case-insensitive (RFC 9110)
        (f"Basic {base64.b64encode(f'alice:{ALICE}'.encode()).decode()}", False),
        (f"Bearer {ALICE}x", False),
        (f"Bearer {ALICE[:-1]}", False),
        ("Bearer", False),
        (f"Token {ALICE}", False),
        (f"Bearer {ALICE.upper()}", False),
    ],
)
async def test_token_forms(gateway, sandbox, authorization, accepted):
    since = last_id(sandbox)
    status, _ = await send(gateway, PODS, [("Authorization", authorization)])
    if accepted:
        assert status == 200
        assert_arrived_as_alice_only(sandbox.requests_log(since))
    else:
        assert status == 401
        assert sandbox.requests_log(since) == []


async def test_websocket_bearer_subprotocol_is_not_forwarded(gateway, sandbox):
    """Browsers pass a token as a WebSocket subprotocol; the API server believes it. A caller must not be able to
    hand the API server a second credential that way."""
    since = last_id(sandbox)
    smuggled = "base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(
        sandbox.token.encode()
    ).decode().rstrip("=")
    path = f"{PODS}/web/exec?command=echo&command=hi&stdout=true"
    url = gateway.url.replace("https://", "wss://") + path
    async with connect(
        url,
        subprotocols=[smuggled, "v5.channel.k8s.io"],
        additional_headers={"Authorization": f"Bearer {ALICE}"},
        ssl=client_ssl(gateway),
    ) as ws:
        assert ws.subprotocol == "v5.channel.k8s.io"
        async for _ in ws:
            pass
    records = [r for r in sandbox.requests_log(since) if r["websocket"]]
    assert_arrived_as_alice_only(records)
    for record in records:
        offered = ",".join(record["headers"].get("sec-websocket-protocol", []))
        assert "bearer" not in offered and sandbox.token not in json.dumps(record)
