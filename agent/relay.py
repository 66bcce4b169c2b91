"""The agent's request relay: each tunnel channel is parsed as HTTP/1.1 requests, checked, re-serialised with
the agent's own credential and written to one upstream connection of its own; the answers come back as bytes.

This replaces running aiohttp's server and client per request (which re-parsed and re-serialised every
response and re-framed every WebSocket frame): responses come from the API server, which the agent trusts,
so they are relayed as they are, only parsed alongside to learn each one's status and end for the log line.

Requests come from the gateway, which the agent does not trust (a compromised gateway must not smuggle a
request past the checks), so nothing the gateway sends is relayed raw until a WebSocket upgrade succeeded:
- every request is parsed with llhttp (httptools, strict: no obs-fold, no bare LF, no CL+TE, no duplicate
  Content-Length); any parser error answers 400 and closes the channel;
- the request line and headers the API server sees are rebuilt by the agent from the parsed pieces, minus
  hop-by-hop, credential and cookie headers, plus the agent's ``Host`` and credential;
- the body is re-framed by the agent (the parsed Content-Length, or one chunk per piece), so the upstream
  sees exactly the requests the agent parsed and checked, whatever framing the gateway claimed;
- impersonation is checked before anything is sent; a refusal answers 403 and closes the channel;
- an upgrade is sent with ``Connection: Upgrade, close``: after any answer but 101 the API server closes,
  and whatever the gateway sent after the upgrade request is dropped, never parsed nor sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from kubegate.connections.agent.upstream import READINESS_PATH
from kubegate.connections.kubernetes import KubernetesUpstream
from kubegate.core.headers import is_credential_header

from .forward import Refused, RequestLog, check_impersonation, log, status_response

# Never passed on as the gateway sent them (the agent frames the message itself).
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
     b"host", b"content-length")
)  # fmt: skip
# A request target the agent passes on: origin-form, no control byte, space or DEL (they could split the line).
UNSAFE_TARGET_BYTE = re.compile(rb"[\x00-\x20\x7f]")
UNSAFE_HEADER_BYTE = re.compile(rb"[\x00\r\n]")
MAX_HEAD_BYTES = 256 * 1024  # request line plus headers; aiohttp's server allowed 64 KiB a line


class _Stop(Exception):
    """Raised from a parser callback: the request was refused (``RelayProtocol._refusal`` says how)."""


@dataclass
class _Exchange:
    """One request on a channel and what is known of its answer (kept in order: requests may be pipelined)."""

    record: dict[str, Any]
    started: float
    method: bytes
    local: bool = False  # answered by the agent itself (readiness, refusals), not the API server
    answer: bytes | None = None  # a local exchange's complete HTTP response, once known
    close_after: bool = False  # close the channel once this exchange is answered
    upgrade: bool = False
    status: int = 0
    body_bytes: int = 0
    sent: bool = False  # some of it went to the API server
    logged: bool = field(default=False, repr=False)


class Forwarder:
    """The agent's relay for one served connection (one cluster): ``server()`` gives the protocol for a new
    tunnel channel."""

    def __init__(
        self, connection: str, upstream: KubernetesUpstream, allow_system: list[str], requests: RequestLog
    ):
        self.connection = connection
        self.upstream = upstream
        self.allow_system = allow_system
        self.requests = requests
        base = URL(upstream.base_url)
        self.secure = base.scheme == "https"
        self.host = base.raw_host or ""
        self.port = base.explicit_port or (443 if self.secure else 80)
        self.authority = base.raw_authority.encode("ascii")
        self.path_prefix = base.raw_path.rstrip("/").encode("ascii")
        self.server_hostname = upstream.request_options.get("server_hostname") or self.host

    def server(self) -> RelayProtocol:
        return RelayProtocol(self)

    async def open_upstream(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        """A new connection to the API server, speaking to `protocol`."""
        loop = asyncio.get_running_loop()
        timeout = self.upstream.limits.upstream_connect_timeout_seconds
        ssl_context: ssl.SSLContext | None = self.upstream.ssl_context if self.secure else None
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: protocol, self.host.strip("[]"), self.port, ssl=ssl_context,
                server_hostname=self.server_hostname if ssl_context is not None else None,
            )  # fmt: skip
        return transport

    async def readiness(self) -> tuple[int, bytes]:
        """The API server's /readyz through the upstream's own session: (status for the gateway, text)."""
        try:
            async with asyncio.timeout(3):
                resp = await self.upstream.session.get(
                    f"{self.upstream.base_url}/readyz",
                    headers=self.upstream.credential_headers(),
                    **self.upstream.request_options,
                )
                async with resp:
                    await resp.read()
                    return (200 if resp.status == 200 else 503), str(resp.status).encode()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 503, type(exc).__name__.encode()


def _response(status: int, body: bytes, content_type: bytes, *, close: bool) -> bytes:
    reason = http.HTTPStatus(status).phrase.encode() if status in http.HTTPStatus._value2member_map_ else b""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (status, reason, content_type,
                                                                            len(body))  # fmt: skip
    return head + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body


def _refusal_bytes(exc: Refused) -> bytes:
    response = status_response(exc.status, exc.reason, exc.message)
    assert isinstance(response.body, bytes)
    return _response(exc.status, response.body, b"application/json", close=True)


class _UpstreamSide(asyncio.Protocol):
    """The API server's side of a channel's relay: hands everything to the channel's RelayProtocol."""

    def __init__(self, relay: RelayProtocol):
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.upstream_data(data)

    def eof_received(self) -> bool:
        return False  # close: an answer delimited by the end of the connection is complete

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost(self)

    def pause_writing(self) -> None:
        self.relay.pause_channel("upstream-full")

    def resume_writing(self) -> None:
        self.relay.resume_channel("upstream-full")


class RelayProtocol(asyncio.Protocol):
    """One tunnel channel: requests parsed and re-serialised to one upstream connection, answers relayed."""

    def __init__(self, forwarder: Forwarder):
        self.f = forwarder
        self.channel: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.exchanges: deque[_Exchange] = deque()
        self.closed = False
        self.stopped = False  # no more request parsing: refused, not keep-alive, or an upgrade sent
        self.raw = False  # after a 101: bytes both ways as they are
        self._refusal: Refused | None = None
        self._final = False  # the request parsed last was the gateway's last one (or an upgrade)
        self._paused: set[str] = set()
        # the request being parsed
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_headers = False
        self._current: _Exchange | None = None
        self._chunked = False
        self._head_bytes = 0
        # the upstream connection and what waits for it
        self.upstream: asyncio.Transport | None = None
        self._upstream_side: _UpstreamSide | None = None
        self._connecting: asyncio.Task[None] | None = None
        # for the upstream, while connecting or while an earlier local answer is pending
        self._held: list[tuple[_Exchange, bytes]] = []
        self._after_upgrade: list[bytes] = []  # the gateway's bytes after an upgrade request, until 101
        self._response_parser = httptools.HttpResponseParser(self._ResponseEvents(self))
        self._head_scan = bytearray()  # a HEAD request's answer, read up to its blank line by hand
        self._readiness: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ channel side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.channel = cast(asyncio.Transport, transport)  # uvloop's TLS transport is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.raw:
            if self.upstream is not None:
                self.upstream.write(data)
            return
        if self.stopped:
            if self.exchanges and self.exchanges[-1].upgrade:
                self._after_upgrade.append(data)  # sent only if the API server switches protocols
            return  # after a refusal or a final request: nothing more is parsed or sent
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._current is None or not self._current.upgrade:
                self._refuse(Refused(400, "BadRequest", "kubegate agent: unexpected upgrade"))
                return
            self._current = None
            self.stopped = True
            rest = data[int(upgrade.args[0]) :]
            if rest:
                self._after_upgrade.append(rest)
            self.pause_channel("upgrade")  # until the API server answers the upgrade
        except httptools.HttpParserCallbackError as exc:
            if self._refusal is not None:
                self._refuse(self._refusal)
            elif not self._final:
                log.error("%s: relay error: %r", self.f.connection, exc.__context__)
                self._refuse(Refused(500, "InternalError", "kubegate agent: relay error"))
            # else: bytes after the gateway's last request, never parsed nor sent
        except httptools.HttpParserError as exc:
            self._refuse(Refused(400, "BadRequest", f"kubegate agent: malformed request ({exc})"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.closed:
            self.upstream.resume_reading()

    def pause_channel(self, reason: str) -> None:
        if not self._paused and self.channel is not None and not self.closed:
            self.channel.pause_reading()
        self._paused.add(reason)

    def resume_channel(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.channel is not None and not self.closed:
                self.channel.resume_reading()

    # -- request parser callbacks --
    def on_message_begin(self) -> None:
        if self.stopped:
            self._final = True
            raise _Stop("a request after the last one")  # pipelined after a final request: dropped
        self._url.clear()
        self._headers = []
        self._in_headers = True
        self._chunked = False
        self._head_bytes = 0
        self._current = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:
            return  # a chunked body's trailer: never passed on (the agent ends the body itself)
        self._headers.append((name, value))
        self._grow_head(len(name) + len(value))

    def _grow_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._stop(Refused(431, "RequestHeaderFieldsTooLarge", "kubegate agent: request head too large"))

    def _stop(self, refusal: Refused) -> None:
        self._refusal = refusal
        raise _Stop(refusal.message)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        method = self.parser.get_method()
        target = bytes(self._url)
        started = time.monotonic()
        record: dict[str, Any] = {"time": round(time.time(), 3), "connection": self.f.connection,
                                  "method": method.decode("latin-1"), "path": target.decode("latin-1")}  # fmt: skip
        exchange = _Exchange(record=record, started=started, method=method)
        self._current = exchange
        keep_alive = self.parser.should_keep_alive()
        if method == b"GET" and target == READINESS_PATH.encode():
            exchange.local = True
            exchange.close_after = not keep_alive
            self.exchanges.append(exchange)
            self._readiness = asyncio.ensure_future(self._answer_readiness(exchange))
            if not keep_alive:
                self.stopped = True
            return
        self.exchanges.append(exchange)  # from here every refusal is logged in order
        if not target.startswith(b"/") or UNSAFE_TARGET_BYTE.search(target):
            self._stop(
                Refused(400, "BadRequest", "kubegate agent: refusing a request target that is not a path")
            )
        lengths = [v for n, v in self._headers if n.lower() == b"content-length"]
        encodings = [v for n, v in self._headers if n.lower() == b"transfer-encoding"]
        if lengths and encodings:
            self._stop(
                Refused(400, "BadRequest", "kubegate agent: both Content-Length and Transfer-Encoding")
            )
        if len(lengths) > 1 or (lengths and not lengths[0].strip().isdigit()):
            self._stop(Refused(400, "BadRequest", "kubegate agent: invalid Content-Length"))
        if len(encodings) > 1 or (encodings and encodings[0].strip().lower() != b"chunked"):
            self._stop(Refused(400, "BadRequest", "kubegate agent: a Transfer-Encoding other than chunked"))
        upgrade = self.parser.should_upgrade()
        if upgrade and (method != b"GET" or lengths or encodings):
            self._stop(Refused(400, "BadRequest", "kubegate agent: an upgrade must be a GET without a body"))
        text: CIMultiDict[str] = CIMultiDict()
        for name, value in self._headers:
            if UNSAFE_HEADER_BYTE.search(value):
                self._stop(Refused(400, "BadRequest", "kubegate agent: invalid header value"))
            if name.lower().startswith(b"impersonate-"):
                text.add(name.decode("latin-1"), value.decode("latin-1"))
        try:
            record["user"], record["groups"] = check_impersonation(
                CIMultiDictProxy(text), self.f.allow_system
            )
        except Refused as exc:
            self._stop(exc)
        upgrade_value = b""
        head = [method, b" ", self.f.path_prefix, target, b" HTTP/1.1\r\nHost: ", self.f.authority, b"\r\n"]
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"upgrade":
                upgrade_value = value
            # Headers the gateway's Connection header names are not dropped: it could name Impersonate-User
            # and have the request reach the API server as the agent itself.
            if lname in HOP_BY_HOP or lname == b"cookie":
                continue
            if is_credential_header(lname.decode("latin-1")) and not lname.startswith(b"impersonate-"):
                continue  # the gateway's Authorization (if any) and front-proxy headers: never passed on
            head += (name, b": ", value, b"\r\n")
        for name_str, value_str in self.f.upstream.credential_headers():
            head += (name_str.encode("latin-1"), b": ", value_str.encode("latin-1"), b"\r\n")
        if upgrade:
            exchange.upgrade = exchange.close_after = True
            head += (b"Connection: Upgrade, close\r\nUpgrade: ", upgrade_value, b"\r\n")
        elif not keep_alive:
            exchange.close_after = True
            head.append(b"Connection: close\r\n")
        if lengths:
            head.append(b"Content-Length: %d\r\n" % int(lengths[0]))
        elif encodings:
            self._chunked = True
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        if exchange.close_after and not upgrade:
            self.stopped = True  # the gateway asked for the last request; nothing after it is parsed
        self._send(b"".join(head))

    def on_body(self, body: bytes) -> None:
        exchange = self._current
        if exchange is None or exchange.local or not body:
            return
        if self._chunked:
            self._send(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._send(body)

    def on_message_complete(self) -> None:
        exchange = self._current
        if exchange is not None and not exchange.local and self._chunked:
            self._send(b"0\r\n\r\n")
        if exchange is not None and not exchange.upgrade:
            self._current = None

    # -- refusals and local answers --
    def _refuse(self, refusal: Refused) -> None:
        """Answer `refusal` in turn and close the channel: nothing more is parsed or sent upstream."""
        self.stopped = True
        self._after_upgrade = []
        exchange = self._current
        if exchange is None:  # refused before its head was complete
            exchange = _Exchange(record={"time": round(time.time(), 3), "connection": self.f.connection,
                                         "method": self.parser.get_method().decode("latin-1") if self._url else "-",
                                         "path": bytes(self._url).decode("latin-1") or "-"},
                                 started=time.monotonic(), method=b"")  # fmt: skip
            self.exchanges.append(exchange)
        self._current = None
        exchange.record["error"] = refusal.message
        exchange.status = refusal.status
        if exchange.sent:
            # Its head went upstream before the body was refused: the answer cannot be trusted to end
            # where the agent thinks, so the channel ends here.
            self._close()
            return
        exchange.local = True
        exchange.close_after = True
        exchange.answer = _refusal_bytes(refusal)
        self._answer_local()

    async def _answer_readiness(self, exchange: _Exchange) -> None:
        status, text = await self.f.readiness()
        exchange.answer = _response(status, text, b"text/plain; charset=utf-8", close=exchange.close_after)
        exchange.status = status
        exchange.logged = True  # the readiness probe is not a request of anyone's
        self._answer_local()

    def _answer_local(self) -> None:
        """Write the local answers that are next in turn; release what was held for the upstream."""
        while self.exchanges and self.exchanges[0].local and self.exchanges[0].answer is not None:
            exchange = self.exchanges.popleft()
            if self.channel is not None and not self.closed:
                self.channel.write(exchange.answer)  # type: ignore[arg-type]
            self._finish(exchange)
            if exchange.close_after:
                self._close()
                return
        self._release_held()

    def _waiting_local(self) -> bool:
        return any(e.local for e in self.exchanges)

    # ------------------------------------------------------------------ upstream side
    def _send(self, data: bytes) -> None:
        """Bytes of the current request for the API server, in order: held while connecting or while an
        earlier request waits for a local answer (which must reach the gateway first)."""
        exchange = self._current
        assert exchange is not None
        exchange.sent = True
        if self.upstream is not None and not self._held and not self._waiting_local():
            self.upstream.write(data)
            return
        self._held.append((exchange, data))
        self.pause_channel("held")
        if self.upstream is None and self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())

    def _release_held(self) -> None:
        """Send what was held for requests with no pending local answer before them."""
        if not self._held or self.closed:
            return
        if self.upstream is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            return
        clear: set[int] = set()
        for exchange in self.exchanges:
            if exchange.local:
                break
            clear.add(id(exchange))
        ready = 0
        while ready < len(self._held) and id(self._held[ready][0]) in clear:
            ready += 1
        if ready:
            self.upstream.write(b"".join(data for _, data in self._held[:ready]))
            del self._held[:ready]
        if not self._held:
            self.resume_channel("held")

    async def _connect(self) -> None:
        side = _UpstreamSide(self)
        try:
            transport = await self.f.open_upstream(side)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._connecting = None
            self._unreachable(exc)
            return
        self._connecting = None
        if self.closed:
            transport.close()
            return
        self.upstream, self._upstream_side = transport, side
        self._response_parser = httptools.HttpResponseParser(self._ResponseEvents(self))
        self._head_scan.clear()
        self._release_held()

    def _unreachable(self, exc: BaseException) -> None:
        refusal = Refused(503, "ServiceUnavailable", f"kubegate agent: the API server is unreachable "
                          f"({type(exc).__name__}: {exc})")  # fmt: skip
        self._held.clear()
        for exchange in self.exchanges:
            if not exchange.local:
                exchange.status = refusal.status
                exchange.record["error"] = refusal.message
        if self.exchanges and not self.exchanges[0].local and self.channel is not None and not self.closed:
            self.channel.write(_refusal_bytes(refusal))
        self._close()

    def upstream_data(self, data: bytes) -> None:
        if self.closed or self.channel is None:
            return
        if self.raw:
            self.channel.write(data)
            if self.exchanges:
                self.exchanges[0].body_bytes += len(data)
            return
        if not self.exchanges or self.exchanges[0].local:
            self._close()  # an answer to no request of ours
            return
        if self.exchanges[0].method == b"HEAD":
            rest = self._scan_head_answer(data)
            if rest:
                self.upstream_data(rest)
            return
        self.channel.write(data)
        try:
            self._response_parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._switch_protocols()
        except httptools.HttpParserError as exc:
            if not self.raw:
                log.warning(
                    "%s: the API server's answer does not parse (%s); closing", self.f.connection, exc
                )
                self._close()

    def _scan_head_answer(self, data: bytes) -> bytes:
        """A HEAD request's answer has headers only (llhttp would wait for a Content-Length of body)."""
        self._head_scan += data
        end = self._head_scan.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = bytes(self._head_scan[: end + 4]), bytes(self._head_scan[end + 4 :])
        self._head_scan.clear()
        exchange = self.exchanges[0]
        with contextlib.suppress(ValueError, IndexError):
            exchange.status = int(head.split(b" ", 2)[1])
        assert self.channel is not None
        self.channel.write(head)
        if 100 <= exchange.status < 200:
            return rest  # an interim answer; the final one follows
        self._answer_done()
        return rest

    class _ResponseEvents:
        def __init__(self, relay: RelayProtocol):
            self.relay = relay

        def on_headers_complete(self) -> None:
            relay = self.relay
            if relay.exchanges:
                relay.exchanges[0].status = relay._response_parser.get_status_code()

        def on_header(self, name: bytes, value: bytes) -> None:
            relay = self.relay
            if relay.exchanges and name.lower() == b"sec-websocket-protocol":
                relay.exchanges[0].record["subprotocol"] = value.decode("latin-1")

        def on_body(self, body: bytes) -> None:
            if self.relay.exchanges:
                self.relay.exchanges[0].body_bytes += len(body)

        def on_message_complete(self) -> None:
            relay = self.relay
            if not relay.exchanges or relay.raw:
                return
            status = relay.exchanges[0].status
            if status == 101:
                relay._switch_protocols()
            elif not 100 <= status < 200:
                relay._answer_done()

    def _answer_done(self) -> None:
        exchange = self.exchanges.popleft()
        self._finish(exchange)
        if exchange.close_after:
            self._close()
            return
        self._answer_local()

    def _switch_protocols(self) -> None:
        if self.raw:
            return
        exchange = self.exchanges[0] if self.exchanges else None
        if exchange is None or not exchange.upgrade or exchange.status != 101:
            self._close()  # 101 to a request that did not ask for it
            return
        self.raw = True
        exchange.body_bytes = 0
        if self.upstream is not None and self._after_upgrade:
            self.upstream.write(b"".join(self._after_upgrade))
        self._after_upgrade = []
        self.resume_channel("upgrade")

    def upstream_lost(self, side: _UpstreamSide) -> None:
        if side is not self._upstream_side:
            return
        self.upstream = None
        self._upstream_side = None
        self.resume_channel("upstream-full")
        if self.closed:
            return
        if any(not e.local for e in self.exchanges) or self.raw:
            self._close()  # an answer cut short (or ended by the close): the gateway sees the channel end
        # else idle: the next request opens a new connection

    # ------------------------------------------------------------------ ending
    def _finish(self, exchange: _Exchange) -> None:
        if exchange.logged:
            return
        exchange.logged = True
        record = exchange.record
        record["status"] = exchange.status or 499
        if not exchange.local:
            record["bytes"] = exchange.body_bytes
        record["ms"] = round((time.monotonic() - exchange.started) * 1000, 1)
        self.f.requests.write(record)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for exchange in self.exchanges:
            self._finish(exchange)
        self.exchanges.clear()
        self._held.clear()
        self._after_upgrade = []
        for task in (self._connecting, self._readiness):
            if task is not None:
                task.cancel()
        if self.upstream is not None:
            self.upstream.close()
        if self.channel is not None:
            self.channel.close()
