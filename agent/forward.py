"""What the agent does with each request the gateway sends through a tunnel channel: check it, put the
agent's own credential on it, forward it to the API server, and stream the answer back.

The agent is the second line of defence: a gateway that is compromised (or wrong) still cannot use the
agent's credential as itself, nor as a ``system:`` identity (``system:masters`` is cluster-admin), because
every request must impersonate a user and no ``system:`` user or group passes unless the agent's own config
allows it. The agent trusts nothing else the gateway says: credentials it sends are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from kubegate.connections.agent.upstream import READINESS_PATH
from kubegate.connections.kubernetes import KubernetesUpstream
from kubegate.core.headers import is_credential_header
from kubegate.core.proxy import _handshake_body

log = logging.getLogger("kubegate.agent")

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host")
)
WEBSOCKET_HANDSHAKE = frozenset(
    ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol")
)
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}
MAX_REFUSAL_BODY = 64 * 1024


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def status_response(status: int, reason: str, message: str) -> web.Response:
    """A Kubernetes ``Status`` the gateway passes to kubectl as it is."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": status}  # fmt: skip
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


class RequestLog:
    """One line per forwarded request on the agent's log, and optionally a JSON line in a local file."""

    def __init__(self, audit_path: Path | None, json_lines: bool):
        self.json_lines = json_lines
        self._file: IO[str] | None = audit_path.open("a", encoding="utf-8") if audit_path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.json_lines:
            log.info(json.dumps(record, separators=(",", ":")))
        else:
            groups = ",".join(record.get("groups") or [])
            log.info(
                "%s %s %s user=%s groups=%s -> %s %s",
                record["connection"], record["method"], record["path"], record.get("user", "-"),
                groups or "-", record["status"], record.get("error") or f"{record['ms']} ms",
            )  # fmt: skip
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def check_impersonation(headers: CIMultiDictProxy[str], allow_system: list[str]) -> tuple[str, list[str]]:
    """The user and groups the request impersonates; :class:`Refused` unless exactly one user is named and
    no ``system:`` user or group is outside the allow-list."""
    users = headers.getall("Impersonate-User", [])
    if len(users) != 1 or not users[0].strip():
        raise Refused(403, "Forbidden", "kubegate agent: refusing a request that does not impersonate exactly "
                      "one user (the gateway must name the caller)")  # fmt: skip
    user = users[0]
    groups = headers.getall("Impersonate-Group", [])

    def allowed(name: str) -> bool:
        return not name.startswith("system:") or any(fnmatch.fnmatchcase(name, p) for p in allow_system)

    if not allowed(user):
        raise Refused(403, "Forbidden", f"kubegate agent: refusing to impersonate the system user {user!r} "
                      "(not in allow_system_impersonation)")  # fmt: skip
    for group in groups:
        if not allowed(group):
            raise Refused(403, "Forbidden", f"kubegate agent: refusing to impersonate the system group "
                          f"{group!r} (not in allow_system_impersonation)")  # fmt: skip
    return user, groups


class Forwarder:
    """The agent's HTTP handler for one served connection (one cluster)."""

    def __init__(
        self, connection: str, upstream: KubernetesUpstream, allow_system: list[str], requests: RequestLog
    ):
        self.connection = connection
        self.upstream = upstream
        self.allow_system = allow_system
        self.requests = requests
        self.base = URL(upstream.base_url)
        self.server = web.Server(
            self.handle,
            handler_cancellation=True,  # a closed channel (client gone) ends the upstream request too
            max_line_size=65536,
            max_field_size=65536,
            access_log=None,  # RequestLog writes the one line per request
        )

    def _url(self, raw_path: str) -> URL:
        # Exactly the path and query bytes the gateway decided on: built encoded, never requoted.
        path, _, query = raw_path.partition("?")
        return URL.build(scheme=self.base.scheme, authority=self.base.raw_authority,
                         path=self.base.raw_path.rstrip("/") + path, query_string=query, encoded=True)  # fmt: skip

    def _headers(self, request: web.BaseRequest, *, websocket: bool) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lname = name.lower()
            if lname in HOP_BY_HOP or (websocket and lname in WEBSOCKET_HANDSHAKE):
                continue
            if is_credential_header(lname) and not lname.startswith("impersonate-"):
                continue  # the gateway's Authorization (if any) and front-proxy headers: never passed on
            if lname == "cookie":
                continue
            out.add(name, value)
        for name, value in self.upstream.credential_headers():
            out[name] = value
        return out

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        record: dict[str, Any] = {"time": round(time.time(), 3), "connection": self.connection,
                                  "method": request.method, "path": request.raw_path}  # fmt: skip
        response: web.StreamResponse | None = None
        try:
            if request.raw_path == READINESS_PATH and request.method == "GET":
                return await self._readiness()
            record["user"], record["groups"] = check_impersonation(request.headers, self.allow_system)
            if request.headers.get("Upgrade", "").lower() == "websocket":
                response = await self._websocket(request, record)
            else:
                response = await self._http(request, record)
            return response
        except Refused as exc:
            record["error"] = exc.message
            response = status_response(exc.status, exc.reason, exc.message)
            return response
        finally:
            if request.raw_path != READINESS_PATH:
                record["status"] = response.status if response is not None else 499
                record["ms"] = round((time.monotonic() - started) * 1000, 1)
                self.requests.write(record)

    async def _readiness(self) -> web.Response:
        try:
            async with asyncio.timeout(3):
                resp = await self.upstream.session.get(
                    f"{self.upstream.base_url}/readyz",
                    headers=self.upstream.credential_headers(),
                    **self.upstream.request_options,
                )
                async with resp:
                    await resp.read()
                    return web.Response(status=200 if resp.status == 200 else 503, text=str(resp.status))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return web.Response(status=503, text=type(exc).__name__)

    async def _http(self, request: web.BaseRequest, record: dict[str, Any]) -> web.StreamResponse:
        has_body = request.can_read_body
        try:
            upstream = await self.upstream.session.request(
                request.method,
                self._url(request.raw_path),
                headers=self._headers(request, websocket=False),
                data=request.content.iter_any() if has_body else None,
                allow_redirects=False,
                compress=None,
                chunked=None,
                **self.upstream.request_options,
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise Refused(503, "ServiceUnavailable", f"kubegate agent: the API server is unreachable "
                          f"({type(exc).__name__}: {exc})") from None  # fmt: skip
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in RESPONSE_DROP:
                    response.headers.add(name, value)
            length = upstream.headers.get("Content-Length")
            if length is not None and length.isdigit():
                response.content_length = int(length)
            elif upstream.status not in (204, 304) and request.method != "HEAD":
                response.enable_chunked_encoding()  # a watch or `logs -f`: streamed as it comes
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            record["bytes"] = sent
            return response

    async def _websocket(self, request: web.BaseRequest, record: dict[str, Any]) -> web.StreamResponse:
        offered = [
            p.strip() for h in request.headers.getall("Sec-WebSocket-Protocol", []) for p in h.split(",")
        ]
        holder: dict[str, Any] = {}
        token = _handshake_body.set(holder)
        try:
            up = await self.upstream.session.ws_connect(
                self._url(request.raw_path),
                protocols=[p for p in offered if p],
                headers=self._headers(request, websocket=True),
                autoping=True,
                autoclose=False,
                heartbeat=None,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
                **self.upstream.request_options,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if holder.get("status"):  # the API server's own refusal (e.g. RBAC 403), passed on as it is
                return web.Response(status=holder["status"], body=holder.get("body", b""),
                                    headers={"Content-Type": holder.get("content_type") or "text/plain"})  # fmt: skip
            raise Refused(
                502, "BadGateway", f"kubegate agent: the API server refused the upgrade: {exc.message}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Refused(503, "ServiceUnavailable", f"kubegate agent: the API server is unreachable "
                          f"({type(exc).__name__})") from None  # fmt: skip
        finally:
            _handshake_body.reset(token)
        down = web.WebSocketResponse(protocols=(up.protocol,) if up.protocol else (), autoping=True,
                                     autoclose=False, max_msg_size=0)  # fmt: skip
        try:
            await down.prepare(request)
            record["subprotocol"] = up.protocol or ""
            a = asyncio.ensure_future(_pump(down, up))
            b = asyncio.ensure_future(_pump(up, down))
            try:
                await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (a, b):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            with contextlib.suppress(Exception):
                await up.close()
            with contextlib.suppress(Exception):
                await down.close()
        return down


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    """Frames from one side to the other, awaiting each send (the channel's window is the backpressure)."""
    while True:
        message = await source.receive()
        if message.type == aiohttp.WSMsgType.BINARY:
            await target.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.TEXT:
            await target.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.CLOSE:
            await target.close(code=message.data or 1000, message=(message.extra or "").encode())
            return
        elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            await target.close()
            return
