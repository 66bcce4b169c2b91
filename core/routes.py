"""Helpers for plugins' HTTP routes (Quart blueprints served beside the data path)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, jsonify, request

from .attributes import RequestAttributes
from .flow import AuthFailure, Flow, Identity
from .flow import Request as FlowRequest

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


async def authenticate_caller(connection: Connection) -> Identity | AuthFailure | None:
    """The caller of the current route as `connection`'s authentication plugins see its token — the same
    judgement the data path makes (a plugin error counts as a rejection)."""
    headers = [(k.lower(), v) for k, v in request.headers.items()]
    flow_request = FlowRequest(method=request.method, path=request.path, query="", headers=headers,
                               client_addr=request.remote_addr or "")  # fmt: skip
    # Not an API path: policy and audit see a non-resource request.
    flow = Flow(connection=connection, request=flow_request, attributes=RequestAttributes(path=request.path))
    try:
        return await connection.hooks.authenticate(flow)
    except Exception:
        return AuthFailure("authentication failed")


def json_response(body: Any, status: int = 200) -> Response:
    """JSON that no cache or referrer keeps (tokens and approvals go through here)."""
    response = jsonify(body)
    response.status_code = status
    response.headers.update(NO_STORE)
    return response


async def caller_identities(connections: list[Connection]) -> dict[str, Identity]:
    """The caller of the current route on each of `connections` that accepts their token, by connection
    name (a token may be good on some connections only)."""
    found: dict[str, Identity] = {}
    for connection in connections:
        answer = await authenticate_caller(connection)
        if isinstance(answer, Identity):
            found[connection.name] = answer
    return found
