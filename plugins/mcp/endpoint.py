"""`/mcp/NAME`: the MCP endpoint of connection NAME (streamable HTTP, the SDK's session manager, stateless).

In front of the SDK: the connection lookup and authentication through the connection's own
`kubegate_authenticate` plugins (the bearer token kubectl would send). Stateless mode, so every POST is
authenticated on its own and any worker or replica can serve any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from kubegate.core.attributes import RequestAttributes
from kubegate.core.flow import AuditEvent, AuthFailure, Flow, Identity, Request, token_fingerprint

from . import audit
from .calls import Caller
from .tools import build_server

if TYPE_CHECKING:
    from kubegate.core.connections import Connection
    from kubegate.core.gateway import Gateway

    from . import McpSettings

log = logging.getLogger("kubegate.mcp")

PREFIX = b"/mcp/"
SCOPE_KEY = "kubegate.mcp.caller"
Scope = dict[str, Any]
ASGI = Any


class Endpoint:
    def __init__(self, gateway: Gateway, plugin: str):
        self.gateway = gateway
        self.plugin = plugin
        root = logging.getLogger()
        # MCPServer calls logging.basicConfig; a root handler (even a passing one) makes that a no-op.
        placeholder = logging.NullHandler()
        root.addHandler(placeholder)
        try:
            self.server = build_server(self)
        finally:
            root.removeHandler(placeholder)
        # The SDK logs each failed tool call's message at INFO: an API server's refusal may quote what the
        # agent sent (a manifest's values). Its own errors are still logged.
        logging.getLogger("mcp.server.mcpserver.server").setLevel(logging.WARNING)
        self.manager = StreamableHTTPSessionManager(self.server._lowlevel_server, stateless=True)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifetime ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        ready = asyncio.Event()

        async def run() -> None:
            async with self.manager.run():
                ready.set()
                await self._stop.wait()

        self._task = asyncio.ensure_future(run())
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            self._task.result()  # raises why it could not start

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    def wrap(self, app: ASGI) -> ASGI:
        """The gateway's non-API application with `/mcp/` served in front of it."""

        async def asgi(scope: Scope, receive: Any, send: Any) -> None:
            raw_path: bytes = scope.get("raw_path") or scope.get("path", "").encode()
            if scope["type"] == "http" and raw_path.startswith(PREFIX):
                await self.handle(scope, receive, send)
            else:
                await app(scope, receive, send)

        return asgi

    # -- one HTTP request -------------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Any, send: Any) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        name = raw_path[len(PREFIX) :].decode("latin-1").rstrip("/")
        connection = self.gateway.connections.get(name) if "/" not in name else None
        if connection is None or self.plugin not in connection.enabled_plugins:
            await _refuse(
                send,
                404,
                "not_found",
                f"no MCP endpoint here: {self.plugin} is not enabled on this connection",
            )
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        client = scope.get("client") or ("", 0)
        flow_request = Request(method=scope["method"], path=f"/mcp/{name}", query="", headers=headers,
                               client_addr=str(client[0]))  # fmt: skip
        flow = Flow(
            connection=connection, request=flow_request, attributes=RequestAttributes(path=f"/mcp/{name}")
        )
        # Bearer tokens only: a browser's session cookie is no credential for an agent's endpoint.
        try:
            answer = await connection.hooks.authenticate(flow) if flow_request.bearer_token else None
        except Exception:
            log.exception("authentication plugin failed on %s; refusing the MCP request", name)
            answer = None
        if not isinstance(answer, Identity):
            await _refuse(send, 401, "invalid_token", "send a bearer token this connection accepts")
            await self._audit_refusal(connection, flow_request, answer)
            return
        caller = Caller(
            connection=name,
            authorization=flow_request.header("authorization"),
            identity=_identity(answer),
            client=(str(client[0]), int(client[1]) if len(client) > 1 else 0),
            scheme=scope.get("scheme", "https"),
        )
        if scope["method"] == "POST":
            # The SDK reads a message whole, with no bound: read it here, bounded, and hand it on.
            cap = body_cap(connection.limits.max_request_body_bytes)
            body = await _read_bounded(receive, cap, flow_request.header("content-length"))
            if body is None:
                await _refuse(send, 413, "request_too_large", f"an MCP message is at most {cap} bytes")
                return
            receive = _replay(body, receive)
        await self.manager.handle_request({**scope, SCOPE_KEY: caller}, receive, send)

    async def _audit_refusal(self, connection: Connection, request: Request, answer: object) -> None:
        """An unauthenticated MCP request is audited as the data path audits one: who tried (a fingerprint of
        the credential, never the credential) from where, and why it was refused."""
        if not connection.hooks.has_audit:
            return
        authorization = request.header("authorization")
        data = {
            "path": request.path,
            "source": request.client_addr,
            "user_agent": request.user_agent,
            "auth_failure": answer.reason if isinstance(answer, AuthFailure) else
            ("unknown credential" if authorization else "no credential"),
            "credential": token_fingerprint(request.bearer_token or authorization) if authorization else None,
            "status": 401,
        }  # fmt: skip
        event = AuditEvent(kind=audit.REFUSED_KIND, flow_id=uuid.uuid4().hex, connection=connection.name,
                           time=time.time(), data=data)  # fmt: skip
        try:
            await connection.hooks.audit_event(event, connection)
        except Exception:
            log.exception("audit hook failed for a refused MCP request")

    # -- tool calls -------------------------------------------------------------------------------------

    def settings(self, caller: Caller) -> McpSettings:
        from . import McpSettings

        connection = self.gateway.connections.get(caller.connection)
        settings = connection.settings_for(self.plugin) if connection is not None else None
        return settings if isinstance(settings, McpSettings) else McpSettings()

    def begin(self, ctx: Context, tool: str, reason: str, arguments: dict[str, Any]) -> audit.ToolCall:
        request = ctx.request_context.request
        caller = getattr(request, "scope", {}).get(SCOPE_KEY)
        if not isinstance(caller, Caller):  # only ever reached through `handle`
            raise ToolError("this MCP server is only served by kubegate's /mcp/NAME endpoint")
        if not reason.strip():
            raise ToolError("reason must say why you make this call")
        return audit.ToolCall(tool=tool, reason=reason.strip(), arguments=arguments, caller=caller)

    async def finish(self, call: audit.ToolCall, outcome: str, error: str) -> None:
        connection: Connection | None = self.gateway.connections.get(call.caller.connection)
        if connection is None or not connection.hooks.has_audit:
            return
        try:
            await connection.hooks.audit_event(audit.event(connection, call, outcome, error), connection)
        except Exception:
            log.exception("audit hook failed for an MCP tool call")


def body_cap(max_request_body_bytes: int) -> int:
    """The largest MCP message: an `apply` carries a manifest as large as a request body may be, escaped
    into JSON (up to about twice its size), plus the JSON-RPC envelope."""
    return 2 * max_request_body_bytes + 64 * 1024


async def _read_bounded(receive: Any, cap: int, declared: str) -> bytes | None:
    """The request's body, or None when it is (or says it is) larger than `cap`."""
    if declared.isdigit() and int(declared) > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client left: the SDK will notice too
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that gives `body` whole first, then whatever the client sends (its disconnect)."""
    given = False

    async def replayed() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: dict[str, Any] = await receive()
        return message

    return replayed


def _identity(identity: Identity) -> dict[str, Any]:
    """As the API requests' audit events show it."""
    return {"user": identity.user, "person": identity.person, "groups": list(identity.groups),
            "method": identity.method, "issuer": identity.issuer, "claims": identity.claims}  # fmt: skip


async def _refuse(send: Any, status: int, error: str, description: str) -> None:
    """An OAuth-style error, as the SDK's bearer middleware answers (`WWW-Authenticate` on a 401)."""
    body = json.dumps({"error": error, "error_description": description}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")]  # fmt: skip
    if status == 401:
        headers.append(
            (b"www-authenticate", f'Bearer error="{error}", error_description="{description}"'.encode())
        )
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
