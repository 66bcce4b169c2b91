"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the API server's limits on a request's
head (request line and headers), which uvicorn does not have.

The API server (k8s.io/apiserver `SecureServingInfo.Serve`) runs Go's `http.Server` with
`MaxHeaderBytes: 1 << 20` and `ReadHeaderTimeout: 32s`. Go reads at most `MaxHeaderBytes` + 4096 bytes of
request line and headers, then answers 431; it closes a connection whose head has not all arrived within
the timeout. uvicorn with httptools has neither limit: a client that never ended its headers grew the
gateway by the size of what it sent (200 MB sent, +269 MB resident), before any authentication, and a
client that sent one byte now and then held its connection forever. This protocol counts the bytes
received of a request that are not its body (head, chunk framing, trailers) and, past Go's limit, answers
431 (a Kubernetes Status) when the head is what went over, reads nothing more and drops the connection;
it drops a connection whose head is not complete within the timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import STATUS_HEADERS, StatusError

log = logging.getLogger("kubegate")

# Go's http.Server: MaxHeaderBytes (the API server's 1 MiB) plus the 4096 bytes it allows on top.
MAX_HEAD_BYTES = (1 << 20) + 4096
HEAD_TIMEOUT_SECONDS = 32.0  # the API server's ReadHeaderTimeout
# After a 431 the connection is closed this much later, reading nothing meanwhile: closing at once, with the
# client's unread head in the socket, resets the connection and can take the answer with it (Go waits
# 500 ms too, its `rstAvoidanceDelay`).
CLOSE_DELAY_SECONDS = 0.5


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head larger than the API server accepts (431) and
    closing a connection whose head is not complete in `HEAD_TIMEOUT_SECONDS`."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_seconds = HEAD_TIMEOUT_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading_head = True  # until the parser has the whole request line and headers
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Every byte of a request that is not its body counts: the head, and also a chunked body's framing
        # and trailers, which the parser keeps as headers too (an endless trailer grew the gateway as an
        # endless header did). Counted by read, before the parser takes it: at most one read's worth of
        # body above the exact count.
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse_head()
            return
        super().data_received(data)

    def on_body(self, body: bytes) -> None:
        self._head_bytes = max(0, self._head_bytes - len(body))
        super().on_body(body)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The parser saw a request's first byte (also one that came in the chunk of the request before it):
        # its head's time starts.
        self._cancel_head_timer()
        self._head_timer = asyncio.get_running_loop().call_later(
            self.head_timeout_seconds, self._head_timed_out
        )

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before and cycle.scope["method"] not in ("GET", "HEAD"):
            # A request that may have a body (a GET's is not read by the gateway either way): see below.
            cycle.transport = _CycleTransport(self, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head, self._head_bytes = True, 0  # the next request's head starts here

    def on_response_complete(self) -> None:
        # `self.cycle` is the request just answered unless a pipelined one came after it, which it could only
        # once this one's body ended.
        cycle = self.cycle
        body_unread = cycle is not None and cycle.response_complete and cycle.more_body
        super().on_response_complete()
        if body_unread:
            self.close_unread()

    def close_unread(self) -> None:
        """The app answered without reading the request's body to its end (a refusal past its read budget,
        core/httpbody.py): uvicorn would go on parsing and dropping the rest, for ever for an endless body.
        Go's server closes such a connection instead (after at most 256 KiB): read nothing more, and close
        once the answer had time to leave."""
        self.transport.pause_reading()  # after uvicorn's own resume at the response's end
        if self._refused:
            return
        self._refused = True
        self._cancel_head_timer()
        asyncio.get_running_loop().call_later(CLOSE_DELAY_SECONDS, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse_head(self) -> None:
        self._cancel_head_timer()
        self._refused = True
        self.transport.pause_reading()  # what the client still sends waits in its socket, not here
        log.warning("refused a request from %s: its header section (or trailers) is larger than %d bytes",
                    self._peer(), self.max_head_bytes)  # fmt: skip
        if not self._reading_head or (self.cycle is not None and not self.cycle.response_complete):
            # The request went to the app already (its trailers are what went over), or a response is still
            # going out on this connection: no answer can be written in between. Dropped.
            self.transport.abort()
            return
        error = StatusError(431, f"the request's header section is larger than {self.max_head_bytes} bytes",
                            reason="RequestHeaderFieldsTooLarge")  # fmt: skip
        body = error.body()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [f"{name}: {value}\r\n".encode() for name, value in STATUS_HEADERS]
        head += [f"content-length: {len(body)}\r\n".encode(), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        # abort, not close: a TLS close would wait for the client's close_notify, reading (and dropping)
        # whatever the client still sends meanwhile.
        asyncio.get_running_loop().call_later(CLOSE_DELAY_SECONDS, self.transport.abort)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A client that sent part of its next request early (pipelining) while a response (a watch, a
            # held request) goes out: Go reads the next request only after that response, so its time has
            # not started yet.
            self._head_timer = asyncio.get_running_loop().call_later(
                self.head_timeout_seconds, self._head_timed_out
            )
            return
        log.info("closed the connection of %s: no complete request head within %g s", self._peer(),
                 self.head_timeout_seconds)  # fmt: skip
        self.transport.abort()  # as Go does: no TLS goodbye to wait for from a client this slow


class _CycleTransport:
    """The transport as one request's uvicorn cycle sees it, closing the protocol's way when the request's
    body was left unread. uvicorn closes the transport after an answer with `connection: close`; under
    uvloop a TLS transport that closes reads (and drops) what the client still sends until the abort,
    paused or not: 300-400 MB in the half second, measured. Not closed, it stays paused."""

    __slots__ = ("_cycle", "_protocol", "_transport")

    def __init__(self, protocol: GatewayHttpToolsProtocol, cycle: Any):
        self._protocol, self._cycle, self._transport = protocol, cycle, protocol.transport

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._cycle.response_complete and self._cycle.more_body:
            self._protocol.close_unread()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
