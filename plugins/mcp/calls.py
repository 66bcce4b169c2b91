"""Kubernetes API requests made for a tool call: ASGI requests into the gateway's own data path.

Each request enters ``Proxy`` at ``/k8s/NAME/...`` with the agent's own ``Authorization`` header, exactly as a
kubectl request does, so authentication, policy, approvals, masking, impersonation, recording and audit all
apply to it unchanged; nothing here talks to the API server itself. The request runs as a task of its own
(its audit event is written even when the tool call is abandoned) that hears "the client left" when the
agent goes away, like any held kubectl request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from kubegate.core.flow import INTENT_HEADER
from kubegate.core.observe import REQUEST_ID

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

USER_AGENT = "kubegate-mcp"
# A Kubernetes status channel message of an exec (v4/v5 channel protocols): 3 carries the exit Status.
STDOUT, STDERR, STATUS, CLOSE = 1, 2, 3, 255
EXEC_SUBPROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io"]


@dataclass(frozen=True)
class Caller:
    """Who asked, as the MCP endpoint authenticated them, and how to ask again on their behalf."""

    connection: str
    authorization: str  # the agent's own `Authorization` header, passed on as it came
    identity: dict[str, Any]
    client: tuple[str, int]
    scheme: str


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    request_id: str

    def json(self) -> Any:
        return json.loads(self.body)

    def message(self) -> str:
        """The API server's (or the gateway's) `Status` message, or the body's start."""
        try:
            status = self.json()
        except ValueError:
            return self.body[:500].decode(errors="replace")
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
        return self.body[:500].decode(errors="replace")


@dataclass
class ExecOutput:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    exit_status: dict[str, Any] | None = None
    refused: Answer | None = None  # the upgrade was refused (held and denied, RBAC, not found)
    timed_out: bool = False
    request_id: str = ""


def query_string(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in params)


def _headers(
    caller: Caller, reason: str, tool: str, extra: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    # The reason travels percent-encoded (UTF-8), as core's `stated_intent` reads it.
    headers = [
        ("authorization", caller.authorization),
        (INTENT_HEADER, quote(reason, safe=" ")),
        ("user-agent", f"{USER_AGENT}/{tool}"),
        ("host", "kubegate"),
        *extra,
    ]
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def _run_detached(coro: Any) -> tuple[asyncio.Task[None], contextvars.Context]:
    """Start the proxy's handler as a task of its own, in a context we can read its request id from."""
    context = contextvars.copy_context()
    task = asyncio.get_running_loop().create_task(coro, context=context)
    return task, context


async def request(
    gateway: Gateway, caller: Caller, *, method: str, path: str, query: str = "", body: bytes = b"",
    content_type: str = "", reason: str, tool: str, max_bytes: int,
) -> Answer:  # fmt: skip
    """One REST request through the gateway's data path; the body kept up to `max_bytes`."""
    extra = [("accept", "application/json")]
    if body:
        extra += [("content-type", content_type), ("content-length", str(len(body)))]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": caller.scheme, "path": f"/k8s/{caller.connection}{path}",
        "raw_path": f"/k8s/{caller.connection}{path}".encode("ascii"), "query_string": query.encode("ascii"),
        "root_path": "", "headers": _headers(caller, reason, tool, extra), "client": caller.client,
        "server": ("kubegate", 0),
    }  # fmt: skip
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the agent left (the tool call was cancelled): the request's client is gone
        return {"type": "http.disconnect"}

    status, headers, chunks, size, truncated = 0, {}, [], 0, False

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers, size, truncated
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
            }
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            room = max_bytes - size
            if len(chunk) > room:
                chunk, truncated = chunk[:room], True
            chunks.append(chunk)
            size += len(chunk)

    task, context = await _run_detached(gateway.proxy(scope, receive, send))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        gone.set()  # the task goes on to its audit event; the agent is not waiting for it any more
        raise
    return Answer(status, headers, b"".join(chunks), truncated, context.get(REQUEST_ID) or "")


async def exec_command(
    gateway: Gateway, caller: Caller, *, path: str, query: str, reason: str, tool: str, max_bytes: int,
    time_limit: float,
) -> ExecOutput:  # fmt: skip
    """An exec through the gateway's WebSocket data path: the output frames pass the same frame hooks
    (masking, recording) as kubectl's; the output is kept up to `max_bytes`."""
    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "wss" if caller.scheme == "https" else "ws",
        "path": f"/k8s/{caller.connection}{path}", "raw_path": f"/k8s/{caller.connection}{path}".encode("ascii"),
        "query_string": query.encode("ascii"), "root_path": "", "headers": _headers(caller, reason, tool, []),
        "client": caller.client, "server": ("kubegate", 0), "subprotocols": list(EXEC_SUBPROTOCOLS),
    }  # fmt: skip
    output = ExecOutput()
    leave = asyncio.Event()
    accepted = asyncio.Event()  # the time limit starts here: a request held for approval is not running
    connected = False
    refusal: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await leave.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    def keep(buffer: bytearray, data: bytes) -> None:
        room = max_bytes - len(output.stdout) - len(output.stderr)
        if len(data) > room:
            data, output.truncated = data[: max(room, 0)], True
        buffer.extend(data)

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            accepted.set()
        elif kind == "websocket.send":
            data = message.get("bytes")
            if data is None:  # base64 protocols are never offered; a text frame is not output
                return
            if not data:
                return
            channel, payload = data[0], data[1:]
            if channel == STDOUT:
                keep(output.stdout, payload)
            elif channel == STDERR:
                keep(output.stderr, payload)
            elif channel == STATUS:
                with contextlib.suppress(ValueError):
                    output.exit_status = json.loads(payload)
        elif kind == "websocket.http.response.start":
            refusal["status"] = message["status"]
            refusal["headers"] = {k.decode("latin-1").lower(): v.decode("latin-1")
                                  for k, v in message.get("headers", [])}  # fmt: skip
            refusal["body"] = b""
        elif kind == "websocket.http.response.body":
            refusal["body"] = refusal.get("body", b"") + message.get("body", b"")

    task, context = await _run_detached(gateway.proxy(scope, receive, send))
    started = asyncio.ensure_future(accepted.wait())
    try:
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait_for(asyncio.shield(task), time_limit)
    except TimeoutError:
        output.timed_out = True
        leave.set()  # close the session as a client would; the task ends and audits on its own
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)
    except asyncio.CancelledError:
        leave.set()
        raise
    finally:
        started.cancel()
    output.request_id = context.get(REQUEST_ID) or ""
    if refusal:
        output.refused = Answer(
            refusal["status"], refusal["headers"], refusal["body"], False, output.request_id
        )
    return output


async def pending_approval(gateway: Gateway, caller: Caller, path: str) -> dict[str, Any] | None:
    """The caller's own pending approval request for `path`, as the approvals API shows it to them (asked in
    process, with their token: requesters see their own requests), or None (none, or no approvals API)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": caller.scheme, "path": "/api/approvals", "raw_path": b"/api/approvals",
        "query_string": b"state=pending", "root_path": "", "client": caller.client, "server": ("kubegate", 0),
        "headers": [(b"authorization", caller.authorization.encode("latin-1")), (b"host", b"kubegate")],
    }  # fmt: skip
    status, chunks = 0, []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # Quart listens for a disconnect until it has answered: none comes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    app: Any = gateway.app  # an ASGI application (Quart types its messages more narrowly)
    await app(scope, receive, send)
    if status != 200:
        return None
    try:
        items = json.loads(b"".join(chunks)).get("items") or []
    except (ValueError, AttributeError):
        return None
    mine = [
        item for item in items
        if item.get("connection") == caller.connection and item.get("requester") == caller.identity.get("user")
        and str(item.get("path", "")).split("?", 1)[0] == path
    ]  # fmt: skip
    return max(mine, key=lambda item: item.get("created_at") or 0) if mine else None
