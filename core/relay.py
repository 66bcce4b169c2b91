"""The WebSocket relay of exec, attach and port-forward: the upstream handshake (and the API server's own
refusal of it, passed on so kubectl prints it), then frames in both directions through the
`kubegate_stream_frame` plugins, then both sides closed.

Backpressure: one message at a time each way, every send awaited until the other side's socket drains, so
a client that stops reading, or an upstream that floods, blocks the other side instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from .errors import StatusError
from .flow import Flow, Frame, FrameDirection, Session
from .headers import subprotocols_for_upstream
from .httpbody import Receive, Send, describe_error, unavailable

if TYPE_CHECKING:
    from .plugins import ConnectionHooks

log = logging.getLogger("kubegate.proxy")

MAX_HANDSHAKE_ERROR_BODY = 64 * 1024


@dataclass(slots=True)
class HandshakeRefusal:
    """The API server's answer to an upgrade it refused (RBAC's 403, a 404…): relayed as it is. Only an
    error status is (`open_upstream`): any other answer is the response to a plain request, unmasked."""

    status: int = 0
    content_type: str = ""
    body: bytes = b""


# Where the refusal of an upstream WebSocket handshake is kept for the task that asked (see
# `_capture_refusal`): aiohttp's ws_connect raises without the response body.
_handshake_refusal: contextvars.ContextVar[HandshakeRefusal | None] = contextvars.ContextVar(
    "kubegate_handshake_refusal", default=None
)


async def _capture_refusal(
    session: aiohttp.ClientSession, ctx: object, params: aiohttp.TraceRequestEndParams
) -> None:
    refusal = _handshake_refusal.get()
    if refusal is not None and params.response.status != 101:
        refusal.status = params.response.status
        refusal.content_type = params.response.headers.get("Content-Type", "")
        try:
            refusal.body = await params.response.content.read(MAX_HANDSHAKE_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            refusal.body = b""


def handshake_trace_config() -> aiohttp.TraceConfig:
    """The trace WebSocket upgrades go through (`websocket_session`), to keep a refused handshake's
    response."""
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_capture_refusal)
    return trace


# A connection's session → its WebSocket sibling (gone with the session: a reload makes new sessions).
_websocket_sessions: weakref.WeakKeyDictionary[aiohttp.ClientSession, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)


def websocket_session(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """The session a connection's WebSocket upgrades go through: `session`'s pool (its connector, not
    owned: closing `session` closes both), timeout and default headers, plus the handshake trace.

    Why apart: aiohttp makes a trace object per request and sends every tracing signal for each, so a trace
    on the session every REST request uses cost each of them its price for the few upgrades that need it
    (issue 15)."""
    sibling = _websocket_sessions.get(session)
    if sibling is None or sibling.closed:
        sibling = aiohttp.ClientSession(
            connector=session.connector,
            connector_owner=False,
            timeout=session.timeout,
            auto_decompress=session.auto_decompress,
            skip_auto_headers=session.skip_auto_headers,
            headers=session.headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[handshake_trace_config()],
        )
        _websocket_sessions[session] = sibling
    return sibling


class WebSocketClient:
    """The client's side before the upgrade is answered: the only message left to come is its disconnect
    (awaited by plugins that hold the request, see `Request.wait_disconnected`)."""

    __slots__ = ("client_gone", "receive")

    def __init__(self, receive: Receive):
        self.receive = receive
        self.client_gone = False

    async def until_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.client_gone = True
                return


async def open_upstream(flow: Flow, url: URL) -> aiohttp.ClientWebSocketResponse | HandshakeRefusal:
    """The upstream WebSocket, or the API server's refusal of it. Raises StatusError (502, 503) when there is
    neither."""
    upstream = flow.connection.upstream
    refusal = HandshakeRefusal()
    token = _handshake_refusal.set(refusal)
    try:
        ws: aiohttp.ClientWebSocketResponse = await websocket_session(upstream.session).ws_connect(
            url,
            protocols=subprotocols_for_upstream(flow.request.subprotocols),
            headers=flow.upstream_headers,
            autoping=True,
            autoclose=False,
            heartbeat=None,
            max_msg_size=flow.connection.limits.max_websocket_message_bytes,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
            **upstream.request_options,
        )
        return ws
    except aiohttp.WSServerHandshakeError as exc:
        if refusal.status >= 400:
            return refusal
        if refusal.status:
            # Not a refusal: the API server answered as to a plain request (a GET of an object, a list, a
            # log). Its body went through none of the response hooks (masking): it is never passed on.
            raise StatusError(
                502,
                f"the API server answered the WebSocket upgrade with HTTP {refusal.status} instead of "
                "switching protocols; its answer is not passed on",
            ) from None
        raise StatusError(502, f"the API server refused the WebSocket upgrade: {exc.message}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise unavailable(flow, describe_error(exc)) from None
    finally:
        _handshake_refusal.reset(token)


async def send_refusal(send: Send, refusal: HandshakeRefusal) -> None:
    """Pass the API server's own refusal to the client before accepting, so kubectl prints it."""
    headers = [
        (b"content-type", (refusal.content_type or "application/json").encode("latin-1")),
        (b"content-length", str(len(refusal.body)).encode()),
    ]
    await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": refusal.body, "more_body": False})


async def relay_frames(
    flow: Flow, session: Session, ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send
) -> None:
    """Relay messages both ways until either side closes or leaves (sets `session.close_code`)."""
    hooks: ConnectionHooks = flow.connection.hooks
    frame_hooks = hooks.has_frame_hooks

    async def through_hooks(direction: FrameDirection, payload: bytes, text: bool) -> bytes | None:
        """The frame as the `kubegate_stream_frame` plugins left it, or None when one dropped it."""
        frame = Frame(direction, payload, text=text)
        await hooks.stream_frame(flow, session, frame)
        for earlier in frame.before:  # held output of the same protocol: text frames on base64 ones
            await send_to_client(earlier, text)
        return None if frame.drop else frame.data

    async def send_to_client(payload: bytes, text: bool) -> None:
        session.bytes_from_upstream += len(payload)
        # The server's send waits for the client's socket to drain: a client that stops reading stops
        # us reading upstream, so nothing piles up here.
        if text:
            await send({"type": "websocket.send", "text": payload.decode()})
        else:
            await send({"type": "websocket.send", "bytes": payload})

    async def flush() -> None:
        """Give plugins holding output back the chance to send it (timer tick or end of stream)."""
        session.flush_after = None
        frame = Frame(FrameDirection.UPSTREAM_TO_CLIENT, b"", flush=True)
        await hooks.stream_frame(flow, session, frame)
        # A plugin sets `frame.text` when what it held is text frames (the base64 channel protocols).
        for earlier in frame.before:
            await send_to_client(earlier, frame.text)
        if frame.data and not frame.drop:
            await send_to_client(frame.data, frame.text)

    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                session.close_code = message.get("code", 1000)
                return
            data = message.get("bytes")
            text = data is None
            payload: bytes = data if data is not None else (message.get("text") or "").encode()
            if frame_hooks:
                filtered = await through_hooks(FrameDirection.CLIENT_TO_UPSTREAM, payload, text)
                if filtered is None:
                    continue
                payload = filtered
            session.bytes_from_client += len(payload)
            # send_* waits for the socket to drain: a slow API server slows the client down.
            if text:
                await ws.send_str(payload.decode())
            else:
                await ws.send_bytes(payload)

    async def upstream_to_client() -> None:
        while True:
            if session.flush_after is not None:
                try:
                    msg = await ws.receive(timeout=session.flush_after)
                except TimeoutError:
                    await flush()
                    continue
            else:
                msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                text = msg.type is aiohttp.WSMsgType.TEXT
                payload = msg.data.encode() if text else msg.data
                if frame_hooks:
                    filtered = await through_hooks(FrameDirection.UPSTREAM_TO_CLIENT, payload, text)
                    if filtered is None:
                        continue
                    payload = filtered
                if payload or not frame_hooks:  # a plugin may hold a whole frame back
                    await send_to_client(payload, text)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                if frame_hooks:
                    await flush()
                session.close_code = msg.data or 1000
                return
            else:  # CLOSING, CLOSED, ERROR
                session.close_code = session.close_code or 1011
                return

    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None and not isinstance(task.exception(), asyncio.CancelledError):
                log.info("session %s ended with %r", flow.id, task.exception())
    finally:
        for task in tasks:
            task.cancel()


async def close_both(ws: aiohttp.ClientWebSocketResponse, send: Send, session: Session) -> None:
    """Close the upstream WebSocket and the client's with the session's close code (1000 when it has none
    a peer may be sent), and note when the session ended."""
    code = session.close_code or 1000
    if not ws.closed:
        await ws.close(code=code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000)
    try:
        await send({"type": "websocket.close", "code": code if code not in (1005, 1006) else 1000})
    except Exception:  # the client may already be gone
        pass
    session.ended = time.time()
