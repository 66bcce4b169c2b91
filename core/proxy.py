"""The data path: ``/k8s/NAME/...`` requests, proxied to the connection's API server.

Raw ASGI rather than a Quart route, for three measured reasons: every request on this path pays no
framework cost (Quart + aiohttp served 2.3k req/s here against 3.6k for raw ASGI + aiohttp); there is no
response timeout to cut watches and ``logs -f``; and WebSocket frames are pulled from the server's bounded
queue one at a time, so a client that stops reading, or an upstream that floods, blocks the other side
instead of growing the gateway's memory.

Every request is one `Flow` through the same pipeline (docs/architecture.md, "The request path"):

    flow      path check, connection lookup, attributes            `_make_flow`
    admit     authenticate, decide                                 `_admit`
    hold      approval, only when the decision asks for it        `_hold`
    prepare   upstream headers, upstream request hook, check       `_prepare`
    forward   REST: body up, response down (core/httpbody.py)     `_forward`
    relay     exec/attach/port-forward WebSocket (core/relay.py)  `_session`
    record    metrics and the flow's one audit event              `_record`

`_http` and `_websocket` run these steps and end in `_record`, once, whatever happened; a request refused
in `flow` gets its audit event from `__call__` (`_refused_flow`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from . import observe
from .attributes import RequestAttributes, RequestRefused, parse_request, path_unescape
from .bodies import JSON_PATCH, json_patch_problem
from .errors import STATUS_HEADERS, StatusError
from .flow import (
    AuditEvent,
    AuthFailure,
    Decision,
    Flow,
    Identity,
    Request,
    Session,
    Verdict,
    stated_intent,
    token_fingerprint,
)
from .headers import check_upstream_headers, client_headers_for_upstream, impersonation_headers
from .httpbody import (
    WATCH_AFTER_SECONDS,
    BodyReader,
    BodyTooLarge,
    ClientGone,
    DisconnectWatcher,
    Receive,
    Scope,
    Send,
    describe_error,
    drain,
    respond,
    too_large,
    unavailable,
)
from .relay import (
    MAX_HANDSHAKE_ERROR_BODY,
    HandshakeRefusal,
    WebSocketClient,
    close_both,
    open_upstream,
    relay_frames,
    send_refusal,
)
from .relay import handshake_trace_config as handshake_trace_config  # kept importable from here

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from .connections import ConnectionRegistry
    from .plugins import PluginHost

__all__ = [
    "PREFIX",
    "Proxy",
    "Receive",
    "Scope",
    "Send",
    "handshake_trace_config",
    "send_status",
    "split_path",
]

log = logging.getLogger("kubegate.proxy")

PREFIX = b"/k8s/"
# Percent-encodings that could smuggle a separator or a dot segment past the check below.
FORBIDDEN_ENCODINGS = (b"%2f", b"%5c", b"%2e", b"%00", b"%25")
# The audit event's `error` for a client that left while its request was held for approval.
LEFT_WHILE_HELD = "the client went away while waiting for approval"
# ... and while its upstream request waited for the API server's answer.
LEFT_BEFORE_RESPONSE = "the client went away before the API server answered"


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


async def send_status(
    send: Send, error: StatusError, *, websocket: bool = False, close: bool = False
) -> None:
    """Answer with `error`'s Status; `close` (HTTP/1.x only) says the connection closes after it."""
    body = error.body()
    headers = [(k.encode(), v.encode()) for k, v in STATUS_HEADERS]
    headers.append((b"content-length", str(len(body)).encode()))
    if close:
        headers.append((b"connection", b"close"))
    if websocket:
        # Refusing before accept: Hypercorn sends this as a real HTTP response, which kubectl prints.
        await send({"type": "websocket.http.response.start", "status": error.code, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "http.response.start", "status": error.code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class Proxy:
    """Handles every ASGI request under ``/k8s/``."""

    def __init__(self, registry: ConnectionRegistry, plugins: PluginHost | None = None):
        self.registry = registry
        self.plugins = plugins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = scope["type"] == "websocket"
        try:
            flow = self._make_flow(scope, websocket)
        except StatusError as error:
            refused = self._refused_flow(scope, websocket, error)
            ended = True
            if websocket:
                await receive()  # websocket.connect
            else:
                ended = await drain(receive)
            # A body left unread past the drain's budget: the connection closes after the answer
            # (core/http1.py) rather than reading the rest.
            await send_status(send, error, websocket=websocket, close=not ended and _http1(scope))
            if refused is not None:
                await self._deliver(refused, self._audit_event(refused, "request"))
            return
        observe.REQUEST_ID.set(flow.id)  # log lines of this request carry its id
        if websocket:
            await self._websocket(flow, receive, send)
        elif observe.is_stream(flow):
            streams = observe.OPEN_STREAMS.labels(flow.connection.name)
            streams.inc()
            try:
                await self._http(flow, receive, send, _http1(scope))
            finally:
                streams.dec()
        else:
            await self._http(flow, receive, send, _http1(scope))

    # -- the two pipelines ---------------------------------------------------------------------------

    async def _http(self, flow: Flow, receive: Receive, send: Send, http1: bool = True) -> None:
        """REST: admit → hold → prepare → forward → record. `http1`: the request came over HTTP/1.x."""
        limits = flow.connection.limits
        cap = limits.max_request_body_bytes
        body = BodyReader(receive, cap, limits.audit_body_bytes if flow.connection.hooks.has_audit else 0)
        flow.request._body_reader = body.read_all
        flow.request._disconnect_waiter = body.until_disconnect
        try:
            declared = flow.request.header("content-length")
            if declared.isdigit() and int(declared) > cap:
                raise too_large(cap)
            if flow.request.header("upgrade").lower().startswith("spdy"):
                await self._refuse_spdy(flow, await self._admit(flow, body))
            impersonation = await self._admit(flow, body)
            first = await body.first()
            if flow.request.body is None and body.complete:
                flow.request.body = first
            streamed = flow.request.body is None
            await self._prepare(flow, impersonation, keep_length=streamed)
            data = body.stream(first) if streamed else (flow.request.body or None)
            await self._forward(flow, data, body, receive, send)
        except StatusError as error:
            flow.error = error
            if not body.complete:
                await body.discard()
            if flow.response.status == 0:
                flow.response.status = error.code
                # A body left unread past `discard`'s budget: the connection closes after the answer.
                await send_status(send, error, close=not body.complete and http1)
        except RelayedError as relayed:
            flow.response.status = relayed.status
            headers = [
                (b"content-type", relayed.content_type.encode("latin-1")),
                (b"content-length", str(len(relayed.body)).encode()),
            ]
            await send({"type": "http.response.start", "status": relayed.status, "headers": headers})
            await send({"type": "http.response.body", "body": relayed.body, "more_body": False})
        except ClientGone as gone:
            _client_gone(flow, gone)
        finally:
            body.describe(flow.request)
            await self._record(flow)

    async def _websocket(self, flow: Flow, receive: Receive, send: Send) -> None:
        """exec/attach/port-forward: admit → hold → prepare → upgrade upstream → relay → record."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        client = WebSocketClient(receive)
        flow.request._disconnect_waiter = client.until_disconnect
        session: Session | None = None
        open_sessions: Gauge | None = None
        try:
            impersonation = await self._admit(flow, client)
            await self._prepare(flow, impersonation, keep_length=False)
            ws = await open_upstream(flow, self._upstream_url(flow))
            if isinstance(ws, HandshakeRefusal):  # e.g. RBAC's 403: kubectl prints the API server's message
                flow.response.status = ws.status
                await send_refusal(send, ws)
                return
            flow.response.status = 101
            await send({"type": "websocket.accept", "subprotocol": ws.protocol})
            session = Session(flow=flow, subprotocol=ws.protocol or "")
            open_sessions = observe.OPEN_SESSIONS.labels(
                flow.connection.name, flow.attributes.subresource or "other"
            )
            open_sessions.inc()
            await self._session(flow, session, ws, receive, send)
        except StatusError as error:
            flow.error = error
            flow.response.status = error.code
            await send_status(send, error, websocket=True)
        except ClientGone as gone:
            _client_gone(flow, gone)
        finally:
            await self._record(flow, session)
            if open_sessions is not None:
                open_sessions.dec()

    # -- the steps -----------------------------------------------------------------------------------

    def _make_flow(self, scope: Scope, websocket: bool) -> Flow:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        name, raw_rest = split_path(raw_path)
        connection = self.registry.get(name)
        if connection is None:
            raise StatusError(
                404, f'connection "{name}" not found', details={"name": name, "kind": "connections"}
            )
        request = _request(scope, websocket, raw_rest)
        try:
            # Read as the API server reads it (Go's PathUnescape, ParseQuery, RequestInfo); a request it
            # could read differently is refused here, before anyone decides on it.
            attributes = parse_request(request.method, path_unescape(raw_rest), request.raw_query)
        except RequestRefused as exc:
            raise StatusError(exc.code, str(exc)) from None
        except ValueError as exc:
            raise StatusError(404, str(exc)) from None
        # What upstream receives and the audit records: the values the gateway decided on, re-encoded.
        request.query = attributes.canonical_query
        return Flow(
            connection=connection, request=request, attributes=attributes, intent=stated_intent(request)
        )

    def _refused_flow(self, scope: Scope, websocket: bool, error: StatusError) -> Flow | None:
        """The flow of a request refused while it was read (a path, method or query the gateway will not
        read, 400/404/405), for its audit event — when the path names a connection that audits. A request
        for no connection has no audit store to go to (nothing was authenticated, decided or sent).

        Not authenticated (the refusal does not wait for it): the event names the credential by its
        fingerprint. No metrics: their labels would take whatever method the client made up."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        name, _, tail = raw_path[len(PREFIX) :].partition(b"/")
        connection = self.registry.get(name.decode("latin-1"))
        if connection is None or not connection.hooks.has_audit:
            return None
        # The path as sent: it may be what was refused (a dot segment, an escape, bytes that are not ASCII).
        request = _request(scope, websocket, "/" + tail.decode("latin-1"))
        flow = Flow(connection=connection, request=request, attributes=RequestAttributes(path=request.path))
        flow.error, flow.response.status = error, error.code
        return flow

    async def _admit(self, flow: Flow, client: BodyReader | WebSocketClient) -> list[tuple[str, str]]:
        """Authenticate and decide (and hold, when the decision asks for approval); return the impersonation
        headers. Raises StatusError to refuse, ClientGone when the client left meanwhile."""
        hooks = flow.connection.hooks
        try:
            answer = await hooks.authenticate(flow)
        except (StatusError, ClientGone):
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
        # Before any decision: an identity that cannot be written as headers is refused here, not after a
        # policy or an approval hold (which would store it) saw it.
        impersonation = impersonation_headers(answer)
        await self._refuse_ambiguous_json_patch(flow)
        try:
            decision = await hooks.decide(flow)
        except (StatusError, ClientGone):  # a plugin reading the body of a client that left: not its failure
            raise
        except Exception:
            log.exception("decision plugin failed on %s; denying", flow.connection.name)
            raise StatusError(403, "the request was denied because a policy plugin failed") from None
        flow.decision = decision
        if decision is not None and decision.verdict is Verdict.NEEDS_APPROVAL:
            flow.decision = decision = await self._hold(flow, decision)
            if decision.verdict is Verdict.DENY and client.client_gone:
                # Nobody is there to hear the refusal: the request ends as the client's doing (499).
                raise ClientGone(LEFT_WHILE_HELD)
        if decision is not None and decision.verdict is Verdict.DENY:
            raise StatusError(403, decision.reason or "denied by policy", details=_denial_details(flow))
        return impersonation

    async def _refuse_ambiguous_json_patch(self, flow: Flow) -> None:
        """A JSON patch whose pointers the API server's patch library reads otherwise than RFC 6901
        (`x/data/password` is `/data/password` there) is refused with 400 before any plugin judges it: a
        condition or masking reading it as a pointer would judge another field (core/bodies.py)."""
        request = flow.request
        if request.method != "PATCH" or request.websocket or flow.attributes.is_proxy:
            return  # a proxied body is the container's, not a patch the API server applies
        content_types = request.header_values("content-type")
        if not content_types or not content_types[0].startswith(JSON_PATCH):
            return  # the API server reads the first value (Header.Get)
        problem = json_patch_problem(content_types[0], await request.read_body())
        if problem:
            raise StatusError(400, problem)

    async def _hold(self, flow: Flow, decision: Decision) -> Decision:
        """Ask the approval plugins; anything but an answer of allow or deny refuses (fail closed)."""
        try:
            resolved = await flow.connection.hooks.approval(flow, decision)
        except (StatusError, ClientGone):
            raise
        except Exception:
            log.exception("approval plugin failed on %s; denying", flow.connection.name)
            raise StatusError(403, "the request was denied because the approval plugin failed") from None
        if resolved is None or resolved.verdict is Verdict.NEEDS_APPROVAL:
            reason = decision.reason or "this request needs approval"
            return Decision(Verdict.DENY, f"{reason}, and no approval plugin is enabled", decision.rule)
        return resolved

    async def _prepare(self, flow: Flow, impersonation: list[tuple[str, str]], *, keep_length: bool) -> None:
        """The headers sent upstream: the client's, cleaned, plus the gateway's credential and impersonation;
        then `kubegate_upstream_request`; then the check that the identity headers are only the gateway's."""
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

    async def _forward(self, flow: Flow, data: Any, body: BodyReader, receive: Receive, send: Send) -> None:
        """Send the request upstream (`data`: the buffered body, or the body streaming from the client) and
        its response to the client."""
        # A client that leaves cancels the upstream request, as in Go (a reset stream or a closed connection
        # cancels the handler's context), while it waits for the response headers or reads the body. Only
        # once the request body was read whole: until then the body reader notices the disconnect itself.
        watcher = DisconnectWatcher(receive, WATCH_AFTER_SECONDS) if body.complete else None
        upstream = flow.connection.upstream
        limits = flow.connection.limits
        try:
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
                raise too_large(limits.max_request_body_bytes) from None
            except aiohttp.ConnectionTimeoutError:
                raise unavailable(
                    flow, f"no connection within {limits.upstream_connect_timeout_seconds:g} s"
                ) from None
            except TimeoutError:
                raise StatusError(
                    504, f'connection "{flow.connection.name}": the API server did not answer in time'
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                # aiohttp wraps what the body stream raised (the cap, the client leaving) in a ClientOSError:
                # the body reader knows which it was, and neither is the cluster's doing.
                if body.too_large:
                    raise too_large(limits.max_request_body_bytes) from None
                if body.client_gone:
                    raise ClientGone from None
                log.warning("upstream of %s unavailable: %s", flow.connection.name, exc)
                raise unavailable(flow, describe_error(exc)) from None
            if watcher is None and body.complete:  # a streamed body, whole now: watch the response
                watcher = DisconnectWatcher(receive, WATCH_AFTER_SECONDS)
            async with resp:
                await respond(flow, resp, receive, send, watcher)
        except asyncio.CancelledError:
            # aiohttp closed the upstream connection of a request cancelled before its headers; `respond`
            # closes one cancelled mid-body.
            if watcher is None or not watcher.fired:
                raise
            if flow.response.status:  # the status line went out: a response cut short
                raise ClientGone from None
            raise ClientGone(LEFT_BEFORE_RESPONSE) from None
        finally:
            if watcher is not None:
                watcher.stop()

    async def _refuse_spdy(self, flow: Flow, impersonation: list[tuple[str, str]]) -> None:
        """Answer an upgrade to SPDY, which ASGI cannot take over.

        kubectl falls back to SPDY when its WebSocket upgrade is refused, so this attempt must get the same
        answer the WebSocket one got: the API server is asked (without the upgrade, which it refuses
        harmlessly) and its refusal is relayed, e.g. RBAC's 403. Only when it would have allowed the upgrade
        does the client hear that this gateway relays WebSocket only.
        """
        await self._prepare(flow, impersonation, keep_length=False)
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
            raise unavailable(flow, describe_error(exc)) from None
        if resp.status in (401, 403, 404) or resp.status >= 500:
            raise RelayedError(resp.status, resp.headers.get("Content-Type", "application/json"), body)
        raise StatusError(
            400,
            "kubegate relays exec, attach and port-forward over WebSocket only "
            f"(received an upgrade to {flow.request.header('upgrade')!r}); use kubectl 1.30 or newer "
            "and do not set KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false",
        )

    async def _session(
        self, flow: Flow, session: Session, ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send
    ) -> None:
        """An accepted exec/attach/port-forward session: `kubegate_session_start`, the `session_start` audit
        event, frames both ways (core/relay.py), both sides closed, `kubegate_session_end`."""
        hooks = flow.connection.hooks
        try:
            if hooks.has_session_hooks:
                await hooks.session_start(flow, session)
            if hooks.has_audit:
                await self._deliver(
                    flow, self._audit_event(flow, "session_start", subprotocol=session.subprotocol)
                )
            await relay_frames(flow, session, ws, receive, send)
        finally:
            await close_both(ws, send, session)
            if hooks.has_session_hooks:
                await hooks.session_end(flow, session)

    async def _record(self, flow: Flow, session: Session | None = None) -> None:
        """The end of every flow, called once: its metrics and its audit event (`request`, or `session_end`
        for a relayed session)."""
        observe.observe(flow)
        if not flow.connection.hooks.has_audit:
            return
        if session is None:
            event = self._audit_event(flow, "request")
        else:
            event = self._audit_event(
                flow,
                "session_end",
                subprotocol=session.subprotocol,
                bytes_from_client=session.bytes_from_client,
                bytes_from_upstream=session.bytes_from_upstream,
                close_code=session.close_code,
            )
        try:  # inline rather than through `_deliver`: one coroutine less on every audited request
            await flow.connection.hooks.audit_event(event, flow.connection)
        except Exception:
            log.exception("audit hook failed")

    async def _deliver(self, flow: Flow, event: AuditEvent) -> None:
        try:
            await flow.connection.hooks.audit_event(event, flow.connection)
        except Exception:
            log.exception("audit hook failed")

    # -- the audit event -----------------------------------------------------------------------------

    def _audit_event(self, flow: Flow, kind: str, **extra: Any) -> AuditEvent:
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
        return AuditEvent(
            kind=kind, flow_id=flow.id, connection=flow.connection.name, time=flow.wall_time, data=data
        )

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


def _request(scope: Scope, websocket: bool, path: str) -> Request:
    """The client's request as ASGI gave it, its query not yet read (`query` empty)."""
    client = scope.get("client") or ("", 0)
    return Request(
        method="GET" if websocket else scope["method"],
        path=path,
        query="",
        raw_query=scope.get("query_string", b"").decode("latin-1"),
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        scheme=scope.get("scheme", "https"),
        client_addr=str(client[0]),
        websocket=websocket,
        subprotocols=list(scope.get("subprotocols") or []),
    )


def _http1(scope: Scope) -> bool:
    """The request came over HTTP/1.x, where `connection: close` is a header (HTTP/2 forbids it)."""
    return scope.get("http_version", "1.1") in ("1.0", "1.1")


def _client_gone(flow: Flow, gone: ClientGone) -> None:
    """A client that left: 499 unless a status went out already (the response's own, then cut short)."""
    flow.response.status = flow.response.status or 499
    if gone.args:
        flow.error = StatusError(499, str(gone), reason="ClientClosedRequest")


@functools.lru_cache(maxsize=256)
def _parsed_base_url(base_url: str) -> URL:
    """A connection's upstream URL, parsed once rather than on every request."""
    return URL(base_url)


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
    if identity is None:
        # Who tried, when no identity was established (a credential refused, or a request refused before
        # authentication): the credential's fingerprint, never the credential.
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
