"""HTTP body I/O on the data path: the request body read from ASGI (whole, for plugins, or streamed upstream,
under a byte cap), the response body streamed back through the plugins' transformers, and noticing a client
that leaves.

Nothing here buffers more than one chunk unless a plugin asked for the whole request body: every chunk sent
to the client is awaited through the server's `send`, which waits for the client's socket to drain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from .errors import StatusError
from .flow import BodyTransformer, Flow, Request
from .headers import RESPONSE_DROP

log = logging.getLogger("kubegate.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body passed the connection's cap while it was read."""


class ClientGone(Exception):
    """The client left before its response was complete (recorded as 499). The message, when there is one,
    says what the gateway was doing when it noticed (the audit event's `error`)."""


def too_large(cap: int) -> StatusError:
    return StatusError(413, f"the request body is larger than the limit of {cap} bytes")


def unavailable(flow: Flow, why: str) -> StatusError:
    return StatusError(503, f'connection "{flow.connection.name}": the API server is unavailable ({why})')


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"


class BodyReader:
    """Reads the request body from ASGI with a byte cap: whole (for plugins) or streamed (to upstream).

    `client_gone` becomes true once the client's ``http.disconnect`` was read here: how the proxy tells a
    client that left from an upstream that failed.
    """

    __slots__ = ("_first", "cap", "client_gone", "complete", "digest", "receive", "received", "sample",
                 "sample_cap", "too_large")  # fmt: skip

    def __init__(self, receive: Receive, cap: int, sample_cap: int = 0):
        self.receive, self.cap = receive, cap
        self.received = 0
        self.complete = False
        self.too_large = False
        self.client_gone = False
        self._first: bytes | None = None
        # Size, hash and (when small) a copy of the body, for the audit event; computed as it passes.
        self.digest = hashlib.sha256()
        self.sample_cap = sample_cap
        self.sample: bytearray | None = bytearray()

    async def _next(self) -> bytes:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if chunk:
            self.digest.update(chunk)
            if self.sample is not None:
                self.sample = self.sample + chunk if self.received <= self.sample_cap else None
        if not message.get("more_body", False):
            self.complete = True
        if self.received > self.cap:
            self.too_large = True
            raise BodyTooLarge
        return chunk

    async def first(self) -> bytes:
        """The first piece of the body; most requests have their whole body in it."""
        if self._first is None:
            self._first = b"" if self.complete else await self._next()
        return self._first

    async def read_all(self) -> bytes:
        try:
            parts = [await self.first()]
            while not self.complete:
                parts.append(await self._next())
        except BodyTooLarge:
            raise too_large(self.cap) from None
        return b"".join(parts)

    async def stream(self, first: bytes) -> AsyncIterator[bytes]:
        if first:
            yield first
        while not self.complete:
            chunk = await self._next()
            if chunk:
                yield chunk

    async def until_disconnect(self) -> None:
        """After the whole body was read: return when the client disconnects."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                return

    async def discard(self) -> None:
        """Read and drop the rest of a refused request's body, so an HTTP/1.1 client that is still sending
        can read the refusal; past twice the cap the connection is simply left to close."""
        budget = 2 * self.cap
        try:
            while not self.complete and budget > 0:
                message = await self.receive()
                budget -= len(message.get("body", b""))
                if message["type"] == "http.disconnect":
                    self.client_gone = self.complete = True
                elif not message.get("more_body", False):
                    self.complete = True
        except Exception:
            self.complete = True

    def describe(self, request: Request) -> None:
        """Put what passed of the body (size, SHA-256, the whole body when small and complete) on `request`,
        for the audit event."""
        request.body_size = self.received
        if self.received:
            request.body_sha256 = self.digest.hexdigest()
            if self.sample is not None and self.complete:
                request.body_sample = bytes(self.sample)


# How much of a refused request's body is read and dropped when nothing else bounds it (a request for no
# connection): Go's `maxPostHandlerReadBytes`, what net/http discards of an unread body before it closes the
# connection instead.
DRAIN_BYTES = 256 * 1024


async def drain(receive: Receive, budget: int = DRAIN_BYTES) -> bool:
    """Read and drop a refused request's body, at most `budget` bytes of it (then the connection is left to
    close: core/http1.py). True when the body (or the client) ended within the budget."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return True
        budget -= len(message.get("body", b""))
    return False


# A request's disconnect watcher starts this long after its upstream request: most REST requests are over
# before, and pay for a timer instead of a task (docs/performance.md, "Client disconnects"). A client that
# resets a stream at once (HTTP/2 rapid reset) holds its upstream request at most this long.
WATCH_AFTER_SECONDS = 0.05


class DisconnectWatcher:
    """Cancels the task forwarding a request (waiting for its upstream response, or streaming the response
    body) when the client disconnects: Go cancels the handler's context then.

    One watcher per request instead of racing every read against `receive()`. It must start only once the
    request body was read whole (nothing else may call `receive()` meanwhile). With `delay`, the task that
    waits for the disconnect starts that much later, and not at all when the request ends before.
    """

    __slots__ = ("_owner", "_receive", "_task", "_timer", "fired")

    def __init__(self, receive: Receive, delay: float = 0.0):
        self.fired = False
        self._receive = receive
        self._owner = asyncio.current_task()
        self._task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._watch(self._receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.fired = True
        if self._owner is not None:
            self._owner.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        if self.fired and self._owner is not None:
            self._owner.uncancel()


async def respond(
    flow: Flow,
    resp: aiohttp.ClientResponse,
    receive: Receive,
    send: Send,
    watcher: DisconnectWatcher | None = None,
) -> None:
    """Send the API server's response to the client: headers through `kubegate_response_headers`, the body
    chunk by chunk through the `kubegate_response_stream` transformers. Raises ClientGone when the client
    left (noticed by `watcher`, the caller's, or one of its own for a response with no length), or the
    upstream stream broke, after the status line went out; the upstream connection is then closed, not
    returned to the pool half-read."""
    hooks = flow.connection.hooks
    flow.response.status = resp.status
    flow.response.headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in resp.raw_headers
        if name.decode("latin-1").lower() not in RESPONSE_DROP
    ]
    length = resp.headers.get("Content-Length")
    if hooks.has_response_headers:
        await hooks.response_headers(flow)
    transformers: list[BodyTransformer] = (
        await hooks.response_stream(flow) if hooks.has_response_stream else []
    )
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in flow.response.headers]
    if length is not None and not transformers:
        headers.append((b"content-length", length.encode()))
    await send({"type": "http.response.start", "status": flow.response.status, "headers": headers})

    # A watch, `logs -f` or chunked list only ends when the client leaves: notice that at once, and stop
    # reading upstream. A body with a Content-Length ends by itself: the caller's delayed watcher covers it.
    own = watcher is None and length is None
    if own:
        watcher = DisconnectWatcher(receive)
    try:
        async for chunk in resp.content.iter_any():
            for transformer in transformers:
                chunk = transformer.feed(chunk)
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                flow.response.bytes_sent += len(chunk)
        tail = b""
        for index, transformer in enumerate(transformers):
            out = transformer.end()
            for later in transformers[index + 1 :]:
                out = later.feed(out)
            tail += out
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        flow.response.bytes_sent += len(tail)
    except asyncio.CancelledError:
        resp.close()  # the rest of the body is for nobody: the connection goes, not back to the pool
        if watcher is not None and watcher.fired:
            raise ClientGone from None
        raise
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # The stream broke mid-body: the status line is gone already, so end the response abruptly
        # (the client sees a truncated body, never a made-up success).
        log.warning("upstream stream of %s broke: %s", flow.connection.name, exc)
        raise ClientGone from None
    finally:
        if own and watcher is not None:
            watcher.stop()
