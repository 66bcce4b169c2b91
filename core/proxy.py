"""The data path: ``/k8s/NAME/...`` requests, proxied to the connection's API server.

Raw ASGI rather than a Quart route, for three measured reasons: every request on this path pays no
framework cost (Quart + aiohttp served 2.3k req/s here against 3.6k for raw ASGI + aiohttp); there is no
response timeout to cut watches and ``logs -f``; and WebSocket frames are pulled from Hypercorn's bounded
queue one at a time, so a client that stops reading, or an upstream that floods, blocks the other side
instead of growing the gateway's memory.

Request path (see docs/architecture.md):
path check → connection lookup → attributes → authenticate → decide → upstream request hook →
identity-header check → upstream → response headers hook → body transformers → client → audit event.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from . import observe
from .attributes import RequestRefused, parse_request, path_unescape
from .errors import STATUS_HEADERS, StatusError
from .flow import (
    AuditEvent,
    AuthFailure,
    BodyTransformer,
    Decision,
    Flow,
    Frame,
    FrameDirection,
    Identity,
    Request,
    Session,
    Verdict,
    stated_intent,
    token_fingerprint,
)
from .headers import (
    RESPONSE_DROP,
    check_upstream_headers,
    client_headers_for_upstream,
    impersonation_headers,
    subprotocols_for_upstream,
)

if TYPE_CHECKING:
    from .connections import ConnectionRegistry
    from .plugins import PluginHost

log = logging.getLogger("kubegate.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREFIX = b"/k8s/"
# Percent-encodings that could smuggle a separator or a dot segment past the check below.
FORBIDDEN_ENCODINGS = (b"%2f", b"%5c", b"%2e", b"%00", b"%25")
MAX_HANDSHAKE_ERROR_BODY = 64 * 1024

# Where the body of a refused upstream WebSocket handshake is kept for the task that asked (see
# `_capture_handshake_body`): aiohttp's ws_connect raises without it, and kubectl should print the API
# server's own message.
_handshake_body: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kubegate_handshake_body", default=None
)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class RelayedError(Exception):
    """An upstream refusal passed to the client as it is (status, content type, bounded body)."""

    def __init__(self, status: int, content_type: str, body: bytes):
        super().__init__(status)
        self.status, self.content_type, self.body = status, content_type, body


def split_path(raw_path: bytes) -> tuple[str, str]:
    """Split ``/k8s/NAME/rest`` into (NAME, ``/rest``), refusing anything that could leave the connection.

    Dot segments, empty segments, backslashes and encoded separators/dots are refused rather than
    normalised: no Kubernetes client sends them, so their only use is an attack.
    """
    rest = raw_path[len(PREFIX) :]
    name, sep, tail = rest.partition(b"/")
    lowered = rest.lower()
    if any(enc in lowered for enc in FORBIDDEN_ENCODINGS) or b"\\" in rest:
        raise StatusError(400, "the request path contains an encoded separator, dot or backslash")
    if b"#" in rest:
        # Go keeps a `#` in a request path while URL libraries (aiohttp's included) cut a fragment there.
        raise StatusError(400, "the request path contains a '#'")
    segments = tail.split(b"/") if tail else []
    # A trailing slash is fine (`/apis/`); every other segment must be a real name.
    for index, segment in enumerate(segments):
        if segment in (b".", b"..") or (segment == b"" and index != len(segments) - 1):
            raise StatusError(400, "the request path contains an empty or dot segment")
    try:
        name_text = name.decode("ascii")
        path = "/" + tail.decode("ascii") if sep else "/"
    except UnicodeDecodeError:
        raise StatusError(400, "the request path is not ASCII") from None
    if not name_text:
        raise StatusError(404, "no connection named in the path: use /k8s/NAME/...")
    return name_text, path


async def send_status(send: Send, error: StatusError, *, websocket: bool = False) -> None:
    body = error.body()
    headers = [(k.encode(), v.encode()) for k, v in STATUS_HEADERS]
    headers.append((b"content-length", str(len(body)).encode()))
    if websocket:
        # Refusing before accept: Hypercorn sends this as a real HTTP response, which kubectl prints.
        await send({"type": "websocket.http.response.start", "status": error.code, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "http.response.start", "status": error.code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _capture_handshake_body(
    session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
) -> None:
    holder = _handshake_body.get()
    if holder is not None and params.response.status != 101:
        holder["status"] = params.response.status
        holder["content_type"] = params.response.headers.get("Content-Type", "")
        try:
            holder["body"] = await params.response.content.read(MAX_HANDSHAKE_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            holder["body"] = b""


def handshake_trace_config() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_capture_handshake_body)
    return trace


class Proxy:
    """Handles every ASGI request under ``/k8s/``."""

    def __init__(self, registry: ConnectionRegistry, plugins: PluginHost | None = None):
        self.registry = registry
        self.plugins = plugins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = scope["type"] == "websocket"
        try:
            flow = self._make_flow(scope, receive, websocket)
        except StatusError as error:
            if websocket:
                await receive()  # websocket.connect
            else:
                await _drain(receive)
            await send_status(send, error, websocket=websocket)
            return
        observe.REQUEST_ID.set(flow.id)  # log lines of this request carry its id
        if websocket:
            await self._websocket(flow, receive, send)
        elif observe.is_stream(flow):
            streams = observe.OPEN_STREAMS.labels(flow.connection.name)
            streams.inc()
            try:
                await self._http(flow, receive, send)
            finally:
                streams.dec()
        else:
            await self._http(flow, receive, send)

    def _make_flow(self, scope: Scope, receive: Receive, websocket: bool) -> Flow:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        name, raw_rest = split_path(raw_path)
        connection = self.registry.get(name)
        if connection is None:
            raise StatusError(
                404, f'connection "{name}" not found', details={"name": name, "kind": "connections"}
            )
        raw_query = scope.get("query_string", b"").decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        method = "GET" if websocket else scope["method"]
        try:
            # Read as the API server reads it (Go's PathUnescape, ParseQuery, RequestInfo); a request it
            # could read differently is refused here, before anyone decides on it.
            attributes = parse_request(method, path_unescape(raw_rest), raw_query)
        except RequestRefused as exc:
            raise StatusError(exc.code, str(exc)) from None
        except ValueError as exc:
            raise StatusError(404, str(exc)) from None
        client = scope.get("client") or ("", 0)
        request = Request(
            method=method,
            path=raw_rest,
            # What upstream receives and the audit records: the values the gateway decided on, re-encoded.
            query=attributes.canonical_query,
            raw_query=raw_query,
            headers=headers,
            scheme=scope.get("scheme", "https"),
            client_addr=str(client[0]),
            websocket=websocket,
            subprotocols=list(scope.get("subprotocols") or []),
        )
        return Flow(
            connection=connection, request=request, attributes=attributes, intent=stated_intent(request)
        )

    # -- shared steps ----------------------------------------------------------------------------------

    async def _admit(self, flow: Flow) -> list[tuple[str, str]]:
        """Authenticate and decide; return the impersonation headers. Raises StatusError to refuse."""
        hooks = flow.connection.hooks
        try:
            answer = await hooks.authenticate(flow)
        except StatusError:
            raise
        except Exception:
            log.exception("authentication plugin failed on %s; denying", flow.connection.name)
            flow.auth_failure = "authentication plugin error"
            raise StatusError(401, "Unauthorized") from None
        if isinstance(answer, AuthFailure):
            flow.auth_failure = answer.reason
            raise StatusError(401, f"Unauthorized: {answer.reason}" if answer.reason else "Unauthorized")
        if not isinstance(answer, Identity):
            flow.auth_failure = (
                "no credential" if not flow.request.header("authorization") else "unknown credential"
            )
            raise StatusError(401, "Unauthorized")
        flow.identity = answer
        try:
            decision = await hooks.decide(flow)
        except StatusError:
            raise
        except Exception:
            log.exception("decision plugin failed on %s; denying", flow.connection.name)
            raise StatusError(403, "the request was denied because a policy plugin failed") from None
        flow.decision = decision
        if decision is not None and decision.verdict is Verdict.NEEDS_APPROVAL:
            flow.decision = decision = await self._hold(flow, decision)
        if decision is not None and decision.verdict is Verdict.DENY:
            raise StatusError(403, decision.reason or "denied by policy", details=_denial_details(flow))
        return impersonation_headers(answer)

    async def _hold(self, flow: Flow, decision: Decision) -> Decision:
        """Ask the approval plugins; anything but an answer of allow or deny refuses (fail closed)."""
        try:
            resolved = await flow.connection.hooks.approval(flow, decision)
        except StatusError:
            raise
        except Exception:
            log.exception("approval plugin failed on %s; denying", flow.connection.name)
            raise StatusError(403, "the request was denied because the approval plugin failed") from None
        if resolved is None or resolved.verdict is Verdict.NEEDS_APPROVAL:
            reason = decision.reason or "this request needs approval"
            return Decision(Verdict.DENY, f"{reason}, and no approval plugin is enabled", decision.rule)
        return resolved

    def _upstream_url(self, flow: Flow) -> URL:
        """The upstream URL with exactly the path and query bytes decided on: built already encoded, so
        that aiohttp neither requotes them nor reads a `#` as a fragment."""
        base = _parsed_base_url(flow.connection.upstream.base_url)
        return URL.build(
            scheme=base.scheme,
            authority=base.raw_authority,
            path=base.raw_path.rstrip("/") + flow.request.path,
            query_string=flow.request.query,
            encoded=True,
        )

    async def _prepare_upstream(
        self, flow: Flow, impersonation: list[tuple[str, str]], *, keep_length: bool
    ) -> None:
        upstream = flow.connection.upstream
        credential = upstream.credential_headers()
        flow.upstream_headers = [
            *client_headers_for_upstream(
                flow.request.headers, websocket=flow.request.websocket, keep_length=keep_length
            ),
            *credential,
            *impersonation,
        ]
        if flow.connection.hooks.has_upstream_request:
            await flow.connection.hooks.upstream_request(flow)
        check_upstream_headers(flow.upstream_headers, credential, impersonation)

    async def _audit(self, flow: Flow, kind: str = "request", **extra: Any) -> None:
        if kind in ("request", "session_end"):  # every flow ends in exactly one of these
            observe.observe(flow)
        hooks = flow.connection.hooks
        if not hooks.has_audit:
            return
        fields = self.plugins.audit_fields(flow) if self.plugins is not None else {}
        data = _audit_data(flow, fields, **extra)
        for key in ("query", "raw_query"):
            if isinstance(data.get(key), str) and data[key]:
                data[key] = self._query_record(flow, data[key])
        if flow.intent:  # stated text is recorded as stored text is: masked (no plugin to mask: left out)
            masked = self.plugins.record_text(flow, flow.intent.encode()) if self.plugins is not None else b""
            data["intent"] = masked.decode(errors="replace")
        if flow.request.body_size and kind == "request":
            data["request_body"] = self._body_record(flow)
        event = AuditEvent(
            kind=kind, flow_id=flow.id, connection=flow.connection.name, time=flow.wall_time, data=data
        )
        try:
            await hooks.audit_event(event, flow.connection)
        except Exception:
            log.exception("audit hook failed")

    def _query_record(self, flow: Flow, query: str) -> str | None:
        """The query as audit events carry it: as the `kubegate_record_query` plugins render it (an exec's
        command line masked). A plugin that fails leaves the query out: it may hold a secret."""
        if self.plugins is None:
            return query
        try:
            return self.plugins.record_query(flow, query)
        except Exception:
            log.exception("record_query hook failed; the query is left out of the record")
            return None

    def _body_record(self, flow: Flow) -> dict[str, Any]:
        """The request body as audit events carry it: size, hash and, when it was small enough to keep,
        its content as the `kubegate_record_body` plugins render it (masked). With no such plugin, or a
        plugin that fails, the content is left out: a body is never recorded unmasked."""
        request = flow.request
        record: dict[str, Any] = {"bytes": request.body_size, "sha256": request.body_sha256, "content": None}
        if request.body_sample is None:
            record["omitted"] = "larger than limits.audit_body_bytes"
        elif self.plugins is not None:
            try:
                record["content"] = self.plugins.record_body(flow, request.body_sample)
            except Exception:
                log.exception("record_body hook failed; the body is recorded as size and hash only")
        return record

    # -- REST ------------------------------------------------------------------------------------------

    async def _http(self, flow: Flow, receive: Receive, send: Send) -> None:
        limits = flow.connection.limits
        cap = limits.max_request_body_bytes
        declared = flow.request.header("content-length")
        body_state = _BodyReader(
            receive, cap, limits.audit_body_bytes if flow.connection.hooks.has_audit else 0
        )
        flow.request._body_reader = body_state.read_all
        flow.request._disconnect_waiter = body_state.until_disconnect
        try:
            if declared.isdigit() and int(declared) > cap:
                raise _too_large(cap)
            if flow.request.header("upgrade").lower().startswith("spdy"):
                await self._refuse_spdy(flow, await self._admit(flow))
            impersonation = await self._admit(flow)
            first = await body_state.first()
            if flow.request.body is None and body_state.complete:
                flow.request.body = first
            streamed = flow.request.body is None
            await self._prepare_upstream(flow, impersonation, keep_length=streamed)
            data: Any = body_state.stream(first) if streamed else (flow.request.body or None)
            await self._forward(flow, data, receive, send, body_state)
        except StatusError as error:
            flow.error = error
            if not body_state.complete:
                await body_state.discard()
            if flow.response.status == 0:
                flow.response.status = error.code
                await send_status(send, error)
        except RelayedError as relayed:
            flow.response.status = relayed.status
            await send(
                {
                    "type": "http.response.start",
                    "status": relayed.status,
                    "headers": [
                        (b"content-type", relayed.content_type.encode("latin-1")),
                        (b"content-length", str(len(relayed.body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": relayed.body, "more_body": False})
        except ClientGone:
            flow.response.status = flow.response.status or 499
        finally:
            flow.request.body_size = body_state.received
            if body_state.received:
                flow.request.body_sha256 = body_state.digest.hexdigest()
                if body_state.sample is not None and body_state.complete:
                    flow.request.body_sample = bytes(body_state.sample)
            await self._audit(flow)

    async def _refuse_spdy(self, flow: Flow, impersonation: list[tuple[str, str]]) -> None:
        """Answer an upgrade to SPDY, which ASGI cannot take over.

        kubectl falls back to SPDY when its WebSocket upgrade is refused, so this attempt must get the same
        answer the WebSocket one got: the API server is asked (without the upgrade, which it refuses
        harmlessly) and its refusal is relayed, e.g. RBAC's 403. Only when it would have allowed the upgrade
        does the client hear that this gateway relays WebSocket only.
        """
        await self._prepare_upstream(flow, impersonation, keep_length=False)
        upstream = flow.connection.upstream
        try:
            async with asyncio.timeout(flow.connection.limits.upstream_response_timeout_seconds):
                resp = await upstream.session.request(
                    flow.request.method,
                    self._upstream_url(flow),
                    headers=flow.upstream_headers,
                    allow_redirects=False,
                    **upstream.request_options,
                )
                async with resp:
                    body = await resp.content.read(MAX_HANDSHAKE_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _unavailable(flow, _describe(exc)) from None
        if resp.status in (401, 403, 404) or resp.status >= 500:
            raise RelayedError(resp.status, resp.headers.get("Content-Type", "application/json"), body)
        raise StatusError(
            400,
            "kubegate relays exec, attach and port-forward over WebSocket only "
            f"(received an upgrade to {flow.request.header('upgrade')!r}); use kubectl 1.30 or newer "
            "and do not set KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false",
        )

    async def _forward(self, flow: Flow, data: Any, receive: Receive, send: Send, body: _BodyReader) -> None:
        upstream = flow.connection.upstream
        limits = flow.connection.limits
        try:
            async with asyncio.timeout(limits.upstream_response_timeout_seconds):
                resp = await upstream.session.request(
                    flow.request.method,
                    self._upstream_url(flow),
                    headers=flow.upstream_headers,
                    data=data,
                    allow_redirects=False,
                    compress=None,
                    **upstream.request_options,
                )
        except BodyTooLarge:
            raise _too_large(limits.max_request_body_bytes) from None
        except aiohttp.ConnectionTimeoutError:
            raise _unavailable(
                flow, f"no connection within {limits.upstream_connect_timeout_seconds:g} s"
            ) from None
        except TimeoutError:
            raise StatusError(
                504, f'connection "{flow.connection.name}": the API server did not answer in time'
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            if body.too_large:
                raise _too_large(limits.max_request_body_bytes) from None
            log.warning("upstream of %s unavailable: %s", flow.connection.name, exc)
            raise _unavailable(flow, _describe(exc)) from None
        async with resp:
            await self._respond(flow, resp, receive, send)

    async def _respond(self, flow: Flow, resp: aiohttp.ClientResponse, receive: Receive, send: Send) -> None:
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

        # A watch, `logs -f` or chunked list only ends when the client leaves: notice that, and stop reading
        # upstream. A body with a Content-Length ends by itself, so it needs no watcher task.
        watcher = _DisconnectWatcher(receive) if length is None else None
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
            if watcher is not None and watcher.fired:
                raise ClientGone from None
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # The stream broke mid-body: the status line is gone already, so end the response abruptly
            # (the client sees a truncated body, never a made-up success).
            log.warning("upstream stream of %s broke: %s", flow.connection.name, exc)
            raise ClientGone from None
        finally:
            if watcher is not None:
                watcher.stop()

    # -- WebSocket (exec, attach, port-forward) ---------------------------------------------------------

    async def _websocket(self, flow: Flow, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        flow.request._disconnect_waiter = lambda: _until_websocket_disconnect(receive)
        upstream = flow.connection.upstream
        limits = flow.connection.limits
        try:
            impersonation = await self._admit(flow)
            await self._prepare_upstream(flow, impersonation, keep_length=False)
            holder: dict[str, Any] = {}
            token = _handshake_body.set(holder)
            try:
                ws = await upstream.session.ws_connect(
                    self._upstream_url(flow),
                    protocols=subprotocols_for_upstream(flow.request.subprotocols),
                    headers=flow.upstream_headers,
                    autoping=True,
                    autoclose=False,
                    heartbeat=None,
                    max_msg_size=limits.max_websocket_message_bytes,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
                    **upstream.request_options,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if holder.get("status"):
                    await self._relay_refusal(flow, holder, send)
                    return
                raise StatusError(
                    502, f"the API server refused the WebSocket upgrade: {exc.message}"
                ) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _unavailable(flow, _describe(exc)) from None
            finally:
                _handshake_body.reset(token)
        except StatusError as error:
            flow.error = error
            flow.response.status = error.code
            await send_status(send, error, websocket=True)
            await self._audit(flow)
            return
        flow.response.status = 101
        await send({"type": "websocket.accept", "subprotocol": ws.protocol})
        session = Session(flow=flow, subprotocol=ws.protocol or "")
        await self._relay(flow, session, ws, receive, send)

    async def _relay_refusal(self, flow: Flow, holder: dict[str, Any], send: Send) -> None:
        """Pass the API server's own refusal (e.g. 403 from RBAC) to the client, so kubectl prints it."""
        status, body = holder["status"], holder.get("body", b"")
        flow.response.status = status
        headers = [(b"content-type", (holder.get("content_type") or "application/json").encode("latin-1"))]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        await self._audit(flow)

    async def _relay(
        self, flow: Flow, session: Session, ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send
    ) -> None:
        hooks = flow.connection.hooks
        frame_hooks = hooks.has_frame_hooks
        open_sessions = observe.OPEN_SESSIONS.labels(
            flow.connection.name, flow.attributes.subresource or "other"
        )
        open_sessions.inc()
        try:
            await self._relay_session(flow, session, ws, receive, send, hooks, frame_hooks)
        finally:
            open_sessions.dec()

    async def _relay_session(self, flow: Flow, session: Session, ws: aiohttp.ClientWebSocketResponse,
                             receive: Receive, send: Send, hooks: Any, frame_hooks: bool) -> None:  # fmt: skip
        if hooks.has_session_hooks:
            await hooks.session_start(flow, session)
        await self._audit(flow, "session_start", subprotocol=session.subprotocol)

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
            code = session.close_code or 1000
            if not ws.closed:
                await ws.close(code=code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000)
            try:
                await send({"type": "websocket.close", "code": code if code not in (1005, 1006) else 1000})
            except Exception:  # the client may already be gone
                pass
            session.ended = time.time()
            if hooks.has_session_hooks:
                await hooks.session_end(flow, session)
            await self._audit(
                flow,
                "session_end",
                subprotocol=session.subprotocol,
                bytes_from_client=session.bytes_from_client,
                bytes_from_upstream=session.bytes_from_upstream,
                close_code=session.close_code,
            )


class _BodyReader:
    """Reads the request body from ASGI with a byte cap: whole (for plugins) or streamed (to upstream)."""

    def __init__(self, receive: Receive, cap: int, sample_cap: int = 0):
        self.receive, self.cap = receive, cap
        self.received = 0
        self.complete = False
        self.too_large = False
        self._first: bytes | None = None
        # Size, hash and (when small) a copy of the body, for the audit event; computed as it passes.
        self.digest = hashlib.sha256()
        self.sample_cap = sample_cap
        self.sample: bytearray | None = bytearray()

    async def _next(self) -> bytes:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
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
            raise _too_large(self.cap) from None
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
                return

    async def discard(self) -> None:
        """Read and drop the rest of a refused request's body, so an HTTP/1.1 client that is still sending
        can read the refusal; past twice the cap the connection is simply left to close."""
        budget = 2 * self.cap
        try:
            while not self.complete and budget > 0:
                message = await self.receive()
                budget -= len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    self.complete = True
        except Exception:
            self.complete = True


async def _until_websocket_disconnect(receive: Receive) -> None:
    """Before the upgrade is answered, the only message left to come is the client's disconnect."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class _DisconnectWatcher:
    """Cancels the task streaming a response when the client disconnects.

    One watcher per response instead of racing every chunk read against `receive()`.
    """

    def __init__(self, receive: Receive):
        self.fired = False
        self._owner = asyncio.current_task()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.fired = True
        if self._owner is not None:
            self._owner.cancel()

    def stop(self) -> None:
        self._task.cancel()
        if self.fired and self._owner is not None:
            self._owner.uncancel()


@functools.lru_cache(maxsize=256)
def _parsed_base_url(base_url: str) -> URL:
    """A connection's upstream URL, parsed once rather than on every request."""
    return URL(base_url)


def _too_large(cap: int) -> StatusError:
    return StatusError(413, f"the request body is larger than the limit of {cap} bytes")


def _unavailable(flow: Flow, why: str) -> StatusError:
    return StatusError(503, f'connection "{flow.connection.name}": the API server is unavailable ({why})')


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"


def _denial_details(flow: Flow) -> dict[str, Any] | None:
    attrs = flow.attributes
    if not attrs.resource:
        return None
    return {"name": attrs.name, "group": attrs.api_group, "kind": attrs.resource}


# Keys core writes after the plugins' audit fields (and those it may add: auth failures, a raw query).
_CORE_AUDIT_TAIL = frozenset({"status", "bytes", "latency_ms", "error", "auth_failure", "credential", "raw_query",
                              "request_body", "intent"})  # fmt: skip


def _audit_data(flow: Flow, fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The audit event's data: core's keys, with the plugins' `fields` (kubegate_audit_fields) after
    `decision`; a plugin cannot replace a key core writes."""
    identity = flow.identity
    data: dict[str, Any] = {
        "request_id": flow.id,
        "method": flow.request.method,
        "path": flow.request.path,
        "query": flow.request.query,
        "attributes": flow.attributes.as_dict(),
        "source": flow.request.client_addr,
        "user_agent": flow.request.user_agent,
        "kubectl_command": flow.kubectl_command,
        "kubectl_session": flow.kubectl_session,
        "identity": None
        if identity is None
        else {
            "user": identity.user,
            "person": identity.person,
            "groups": list(identity.groups),
            "method": identity.method,
            "issuer": identity.issuer,
            "claims": identity.claims,
        },
        "decision": None
        if flow.decision is None
        else {
            "verdict": str(flow.decision.verdict),
            "reason": flow.decision.reason,
            "rule": flow.decision.rule,
        },
    }
    for key, value in fields.items():
        if key not in data and key not in _CORE_AUDIT_TAIL:
            data[key] = value
    data["status"] = flow.response.status
    data["bytes"] = flow.response.bytes_sent
    data["latency_ms"] = round(flow.latency_ms, 3)
    data["error"] = flow.error.message if flow.error else None
    if flow.auth_failure:
        data["auth_failure"] = flow.auth_failure
        authorization = flow.request.header("authorization")
        if authorization:
            data["credential"] = token_fingerprint(flow.request.bearer_token or authorization)
    if flow.intent:  # the caller's stated reason; `_audit` masks it
        data["intent"] = flow.intent
    if flow.request.raw_query != flow.request.query:
        # What the client sent, when the gateway forwarded a canonical re-encoding of it instead.
        data["raw_query"] = flow.request.raw_query
    data.update(extra)
    return data
