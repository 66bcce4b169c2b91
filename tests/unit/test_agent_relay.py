"""The agent's request relay (agent/relay.py) in process: a fake tunnel channel on one side, a plain-HTTP
stand-in API server on 127.0.0.1 on the other. The gateway is the attacker here: every smuggling attempt is
refused, and for each one NOTHING reaches the API server (or, where a request is allowed, exactly the one
request the agent parsed and checked)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from kubetest import wait_for_async
from multidict import CIMultiDict, CIMultiDictProxy

from kubegate.agent.forward import Refused, RequestLog, check_impersonation
from kubegate.agent.relay import Forwarder, RelayProtocol
from kubegate.connections.kubernetes import KubernetesUpstream, TokenSource
from kubegate.core.config import LimitSettings

AGENT_TOKEN = "agent-token"
ALICE = b"Impersonate-User: alice\r\nImpersonate-Group: developers\r\n"


@dataclass
class Seen:
    """One request the stand-in API server parsed."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class StandIn:
    """A plain-HTTP API server: answers each request, remembers every byte and every request."""

    port: int = 0
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        standin = self

        class Events:
            current: Seen | None = None
            done: list[Seen] = []
            upgraded = False

            def on_message_begin(self) -> None:
                self.current = Seen("", "", [])

            def on_url(self, url: bytes) -> None:
                assert self.current is not None
                self.current.path += url.decode()

            def on_header(self, name: bytes, value: bytes) -> None:
                assert self.current is not None
                self.current.headers.append((name.decode(), value.decode()))

            def on_body(self, body: bytes) -> None:
                assert self.current is not None
                self.current.body += body

            def on_message_complete(self) -> None:
                assert self.current is not None
                self.current.method = parser.get_method().decode()
                standin.requests.append(self.current)
                self.done.append(self.current)

        events = Events()
        parser = httptools.HttpRequestParser(events)
        try:
            while data := await reader.read(65536):
                self.raw += data
                if events.upgraded:
                    writer.write(b"echo:" + data)  # the WebSocket bytes, echoed as they are
                    continue
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError as exc:
                    self.errors.append(str(exc))
                    break
                for seen in events.done:
                    if seen.path == "/prefix/ws-refused":
                        writer.write(
                            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
                        )
                        await writer.drain()
                        writer.close()
                        return
                    if seen.path == "/prefix/ws":
                        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n")  # fmt: skip
                        events.upgraded = True
                        continue
                    body = f"ok {seen.method} {seen.path} {len(seen.body)}".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
                events.done.clear()
        finally:
            writer.close()


class FakeChannel(asyncio.Transport):
    """The gateway's end of one tunnel channel: what the agent writes back, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = asyncio.Event()
        self.reading = True

    def write(self, data: Any) -> None:
        assert not self.closed.is_set(), "write after close"
        self.out += data

    def close(self) -> None:
        self.closed.set()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Log(RequestLog):
    def __init__(self) -> None:
        super().__init__(None, json_lines=True)
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    state = StandIn()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    for writer in state.writers:
        writer.close()
    await asyncio.sleep(0.01)  # the handlers see their connections end


@pytest.fixture
async def relay(standin: StandIn) -> AsyncIterator[tuple[Forwarder, Log]]:
    upstream = KubernetesUpstream(
        "edge", f"http://127.0.0.1:{standin.port}/prefix", ssl.create_default_context(),
        TokenSource(token=AGENT_TOKEN), LimitSettings(), "test",
    )  # fmt: skip
    await upstream.start()
    requests = Log()
    yield Forwarder("edge", upstream, [], requests), requests
    while OPEN:
        OPEN.pop().connection_lost(None)  # the channel ends: the relay closes its upstream connection
    await upstream.close()


OPEN: list[RelayProtocol] = []


async def channel(forwarder: Forwarder, *chunks: bytes) -> tuple[RelayProtocol, FakeChannel]:
    protocol = forwarder.server()
    OPEN.append(protocol)
    fake = FakeChannel()
    protocol.connection_made(fake)
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    return protocol, fake


async def until(condition: Any, what: str) -> None:
    await wait_for_async(condition, what, timeout=5, interval=0.01)


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP response in `raw`."""
    found: list[tuple[int, bytes]] = []

    class Events:
        body = b""

        def on_message_complete(self) -> None:
            found.append((parser.get_status_code(), self.body))
            self.body = b""

        def on_body(self, body: bytes) -> None:
            self.body += body

    parser = httptools.HttpResponseParser(Events())
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    return found


async def assert_refused(
    forwarder: Forwarder, standin: StandIn, status: int, *chunks: bytes
) -> dict[str, Any]:
    _, fake = await channel(forwarder, *chunks)
    await asyncio.wait_for(fake.closed.wait(), 5)
    await asyncio.sleep(0.05)  # anything that was going to reach the stand-in has
    ((answered, body),) = responses(bytes(fake.out))
    assert answered == status, fake.out
    assert standin.raw == b"" and standin.connections == 0, "nothing may reach the API server"
    return json.loads(body)


# -- the ordinary path ---------------------------------------------------------------------------------
async def test_a_request_is_rebuilt_with_the_agents_credential_and_nothing_of_the_gateways(relay, standin):
    forwarder, log = relay
    _, fake = await channel(
        forwarder,
        b"GET /api/v1/pods?limit=1 HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer gateway-secret\r\n"
        b"Cookie: s=1\r\nX-Remote-User: mallory\r\nProxy-Authorization: x\r\n"
        + ALICE
        + b"Accept: a/b\r\n\r\n",
    )
    await until(lambda: responses(bytes(fake.out)), "the answer")
    assert responses(bytes(fake.out)) == [(200, b"ok GET /prefix/api/v1/pods?limit=1 0")]
    (seen,) = standin.requests
    names = {n.lower(): v for n, v in seen.headers}
    assert names["host"] == f"127.0.0.1:{standin.port}"
    assert names["authorization"] == f"Bearer {AGENT_TOKEN}"
    assert names["impersonate-user"] == "alice" and names["accept"] == "a/b"
    assert not {"cookie", "x-remote-user", "proxy-authorization"} & set(names)
    assert [n for n, _ in seen.headers if n.lower() == "authorization"] == ["Authorization"]
    assert not fake.closed.is_set()  # keep-alive
    (record,) = log.records
    assert record["status"] == 200 and record["user"] == "alice" and record["groups"] == ["developers"]
    assert record["bytes"] == len(b"ok GET /prefix/api/v1/pods?limit=1 0")


async def test_keep_alive_requests_share_one_upstream_connection_and_bodies_are_reframed(relay, standin):
    forwarder, log = relay
    protocol, fake = await channel(forwarder, b"GET /a HTTP/1.1\r\n" + ALICE + b"\r\n")
    await until(lambda: len(responses(bytes(fake.out))) == 1, "the first answer")
    protocol.data_received(b"POST /b HTTP/1.1\r\n" + ALICE + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    await until(lambda: len(responses(bytes(fake.out))) == 2, "the second answer")
    protocol.data_received(b"PUT /c HTTP/1.1\r\n" + ALICE + b"Content-Length: 4\r\n\r\nwxyz")
    await until(lambda: len(responses(bytes(fake.out))) == 3, "the third answer")
    assert [r[1] for r in responses(bytes(fake.out))] == [
        b"ok GET /prefix/a 0", b"ok POST /prefix/b 5", b"ok PUT /prefix/c 4"
    ]  # fmt: skip
    assert standin.connections == 1
    assert [s.body for s in standin.requests] == [b"", b"abcde", b"wxyz"]
    assert b"ext=1" not in standin.raw and b"X-Trailer" not in standin.raw  # the agent framed the body
    assert [r["path"] for r in log.records] == ["/a", "/b", "/c"]


async def test_pipelined_requests_are_answered_and_logged_in_order(relay, standin):
    forwarder, log = relay
    _, fake = await channel(
        forwarder, b"GET /1 HTTP/1.1\r\n" + ALICE + b"\r\nGET /.kubegate-agent/readyz HTTP/1.1\r\n\r\n"
        b"GET /2 HTTP/1.1\r\n" + ALICE + b"\r\n",
    )  # fmt: skip
    await until(lambda: len(responses(bytes(fake.out))) == 3, "three answers")
    got = responses(bytes(fake.out))
    assert got[0] == (200, b"ok GET /prefix/1 0") and got[2] == (200, b"ok GET /prefix/2 0")
    assert got[1][0] == 200  # /readyz of the stand-in (its generic answer) through the upstream's session
    assert [r["path"] for r in log.records] == ["/1", "/2"]  # the readiness probe is not logged


async def test_the_readiness_path_is_answered_by_the_agent(relay, standin):
    forwarder, log = relay
    _, fake = await channel(forwarder, b"GET /.kubegate-agent/readyz HTTP/1.1\r\n\r\n")
    await until(lambda: responses(bytes(fake.out)), "the answer")
    assert responses(bytes(fake.out)) == [(200, b"200")]
    assert [s.path for s in standin.requests] == ["/prefix/readyz"] and log.records == []


async def test_an_unreachable_api_server_is_a_503_status(standin):
    upstream = KubernetesUpstream("edge", "http://127.0.0.1:1", ssl.create_default_context(),
                                  TokenSource(token=AGENT_TOKEN), LimitSettings(), "test")  # fmt: skip
    await upstream.start()
    try:
        forwarder = Forwarder("edge", upstream, [], Log())
        _, fake = await channel(forwarder, b"GET /a HTTP/1.1\r\n" + ALICE + b"\r\n")
        await asyncio.wait_for(fake.closed.wait(), 10)
        ((status, body),) = responses(bytes(fake.out))
        assert status == 503 and json.loads(body)["reason"] == "ServiceUnavailable"
    finally:
        await upstream.close()


async def test_a_websocket_upgrade_relays_raw_bytes_after_101(relay, standin):
    forwarder, log = relay
    protocol, fake = await channel(
        forwarder, b"GET /ws HTTP/1.1\r\n" + ALICE + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\nframe-1",
    )  # fmt: skip
    await until(lambda: b"echo:frame-1" in fake.out, "the first frame echoed")
    protocol.data_received(b"GET /not-a-request HTTP/1.1\r\n\r\n")  # WebSocket bytes now: relayed as they are
    await until(lambda: b"echo:GET /not-a-request" in fake.out, "raw bytes echoed")
    (seen,) = standin.requests
    names = {n.lower(): v for n, v in seen.headers}
    assert names["connection"] == "Upgrade, close" and names["upgrade"] == "websocket"
    assert names["sec-websocket-key"] == "k"
    protocol.connection_lost(None)
    (record,) = log.records
    assert record["status"] == 101 and record["subprotocol"] == "v5.channel.k8s.io"


# -- a compromised gateway: each attempt refused, nothing reaches the API server -----------------------
@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="CL+TE"),
        pytest.param(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="TE-twice"
        ),
        pytest.param(b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", id="TE-chunked-identity"),
        pytest.param(b"Transfer-Encoding: identity\r\n\r\nabc", id="TE-identity"),
        pytest.param(b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", id="CL-twice"),
        pytest.param(b"X-A: b\r\n c\r\n\r\n", id="obs-fold"),
        pytest.param(b"X-A: b\nX-B: c\r\n\r\n", id="bare-LF"),
        pytest.param(b"X-A : b\r\n\r\n", id="space-before-colon"),
    ],
)
async def test_smuggling_framing_is_refused_400(relay, standin, head):
    forwarder, log = relay
    body = await assert_refused(forwarder, standin, 400, b"POST /api/v1/pods HTTP/1.1\r\n" + ALICE + head)
    assert body["kind"] == "Status" and body["code"] == 400
    assert [r["status"] for r in log.records] == [400]


async def test_a_bare_lf_request_line_is_refused(relay, standin):
    forwarder, _ = relay
    await assert_refused(forwarder, standin, 400, b"GET / HTTP/1.1\nImpersonate-User: alice\n\n")


@pytest.mark.parametrize("target", [b"http://evil/", b"*", b"/a\x7fb"])
async def test_a_target_that_is_not_a_path_is_refused(relay, standin, target):
    forwarder, _ = relay
    await assert_refused(forwarder, standin, 400, b"GET " + target + b" HTTP/1.1\r\n" + ALICE + b"\r\n")


@pytest.mark.parametrize(
    "who",
    [
        b"",
        b"Impersonate-User: alice\r\nImpersonate-User: bob\r\n",
        b"Impersonate-User: system:admin\r\n",
        b"Impersonate-User: alice\r\nImpersonate-Group: system:masters\r\n",
        b"Impersonate-User:  system:admin \r\n",
        b"Impersonate-User: alice\r\nImpersonate-Group: \tsystem:masters\r\n",
        b"Impersonate-User:   \r\n",
    ],
    ids=[
        "nobody",
        "two-users",
        "system-user",
        "system-group",
        "spaced-system-user",
        "spaced-system-group",
        "blank-user",
    ],
)
async def test_impersonation_is_checked_before_anything_is_sent(relay, standin, who):
    forwarder, log = relay
    body = await assert_refused(
        forwarder, standin, 403, b"POST /api/v1/pods HTTP/1.1\r\n" + who + b"Content-Length: 3\r\n\r\nabc"
    )
    assert body["reason"] == "Forbidden"
    assert log.records[-1]["status"] == 403


async def test_the_connection_header_cannot_strip_the_impersonation_the_agent_checked(relay, standin):
    forwarder, _ = relay
    _, fake = await channel(
        forwarder, b"GET /a HTTP/1.1\r\nConnection: Impersonate-User, Impersonate-Group\r\n" + ALICE + b"\r\n"
    )
    await until(lambda: responses(bytes(fake.out)), "the answer")
    (seen,) = standin.requests
    assert ("Impersonate-User", "alice") in seen.headers and (
        "Impersonate-Group",
        "developers",
    ) in seen.headers


async def test_a_second_request_hidden_in_a_body_reaches_the_api_server_as_body_only(relay, standin):
    forwarder, _ = relay
    hidden = b"GET /api/v1/secrets HTTP/1.1\r\nImpersonate-User: system:admin\r\n\r\n"
    # The gateway claims a Content-Length covering the hidden request: the agent frames exactly that body.
    _, fake = await channel(
        forwarder, b"POST /a HTTP/1.1\r\n" + ALICE + b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden
    )
    await until(lambda: responses(bytes(fake.out)), "the answer")
    (seen,) = standin.requests
    assert seen.path == "/prefix/a" and seen.body == hidden
    assert responses(bytes(fake.out)) == [(200, b"ok POST /prefix/a %d" % len(hidden))]


async def test_a_request_after_a_short_content_length_is_parsed_and_checked_itself(relay, standin):
    forwarder, log = relay
    hidden = b"GET /api/v1/secrets HTTP/1.1\r\nImpersonate-User: system:admin\r\n\r\n"
    # Content-Length: 0 with the hidden request after it: the agent parses it as a request of its own
    # and refuses it, so the API server sees exactly one request.
    _, fake = await channel(
        forwarder, b"POST /a HTTP/1.1\r\n" + ALICE + b"Content-Length: 0\r\n\r\n" + hidden
    )
    await asyncio.wait_for(fake.closed.wait(), 5)
    await asyncio.sleep(0.05)
    assert [s.path for s in standin.requests] == ["/prefix/a"]
    assert b"secrets" not in standin.raw
    assert [status for status, _ in responses(bytes(fake.out))] == [200, 403]
    assert [r["status"] for r in log.records] == [200, 403]


async def test_nothing_after_a_refused_upgrade_is_parsed_or_sent(relay, standin):
    forwarder, log = relay
    after = b"GET /api/v1/secrets HTTP/1.1\r\n" + ALICE + b"\r\n"
    _, fake = await channel(
        forwarder, b"GET /ws-refused HTTP/1.1\r\n" + ALICE + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        + after, after,
    )  # fmt: skip
    await asyncio.wait_for(fake.closed.wait(), 5)
    await asyncio.sleep(0.05)
    assert [s.path for s in standin.requests] == ["/prefix/ws-refused"]
    assert b"secrets" not in standin.raw
    assert responses(bytes(fake.out)) == [(403, b"no")]
    assert [r["status"] for r in log.records] == [403]


async def test_an_upgrade_with_a_body_or_not_a_get_is_refused(relay, standin):
    forwarder, _ = relay
    await assert_refused(
        forwarder, standin, 400, b"POST /ws HTTP/1.1\r\n" + ALICE + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabc",
    )  # fmt: skip


async def test_requests_after_a_connection_close_request_are_dropped(relay, standin):
    forwarder, _ = relay
    _, fake = await channel(
        forwarder,
        b"GET /a HTTP/1.1\r\n" + ALICE + b"Connection: close\r\n\r\nGET /b HTTP/1.1\r\n" + ALICE + b"\r\n",
    )
    await asyncio.wait_for(fake.closed.wait(), 5)
    assert [s.path for s in standin.requests] == ["/prefix/a"]
    assert responses(bytes(fake.out)) == [(200, b"ok GET /prefix/a 0")]


@pytest.mark.parametrize(
    "who",
    [
        [("Impersonate-User", " system:admin")],
        [("Impersonate-User", "alice"), ("Impersonate-Group", " system:masters")],
        [("Impersonate-User", "alice"), ("Impersonate-Group", "\tsystem:masters")],
    ],
    ids=["system-user", "system-group", "system-group-tab"],
)
def test_impersonation_is_judged_as_the_api_server_reads_it_whatever_parsed_the_headers(who):
    # The agent's own parser drops the spaces already; the check does not rely on it.
    with pytest.raises(Refused) as info:
        check_impersonation(CIMultiDictProxy(CIMultiDict(who)), [])
    assert info.value.status == 403
