"""Helpers for plugins' HTTP routes (Quart blueprints served beside the data path)."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any

from quart import Response, jsonify, request

from .attributes import RequestAttributes
from .errors import StatusError
from .flow import AuthFailure, Flow, Identity
from .flow import Request as FlowRequest
from .headers import impersonation_headers

if TYPE_CHECKING:
    from .connections import Connection

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# The web UI keeps the login's gateway token in this cookie (HttpOnly, Secure, SameSite=Strict).
SESSION_COOKIE = "kubegate_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def csrf_token_for(session_token: str) -> str:
    """The CSRF token of a UI session: derived from the session's own (HttpOnly) token, so a page of
    another site can neither read nor compute it."""
    return hashlib.sha256(f"kubegate-csrf\0{session_token}".encode()).hexdigest()[:40]


async def authenticate_caller(connection: Connection) -> Identity | AuthFailure | None:
    """The caller of the current route as `connection`'s authentication plugins see its token — the same
    judgement the data path makes (a plugin error counts as a rejection).

    A bearer token in `Authorization` comes first; without one, the web UI's session cookie stands in for
    it — on a state-changing request only together with the session's CSRF token (`X-CSRF-Token`)."""
    headers = [(k.lower(), v) for k, v in request.headers.items()]
    if not any(name == "authorization" for name, _ in headers):
        session_token = request.cookies.get(SESSION_COOKIE, "")
        if session_token:
            if request.method not in SAFE_METHODS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, ""), csrf_token_for(session_token)
            ):
                return AuthFailure("the request lacks the page's CSRF token")
            headers.append(("authorization", f"Bearer {session_token}"))
    flow_request = FlowRequest(method=request.method, path=request.path, query="", headers=headers,
                               client_addr=request.remote_addr or "")  # fmt: skip
    # Not an API path: policy and audit see a non-resource request.
    flow = Flow(connection=connection, request=flow_request, attributes=RequestAttributes(path=request.path))
    try:
        answer = await connection.hooks.authenticate(flow)
    except Exception:
        return AuthFailure("authentication failed")
    if isinstance(answer, Identity):
        try:
            # An identity the data path refuses (one the API server would read as another name, a
            # `kubegate:` user) reviews, exchanges and reads nothing either.
            impersonation_headers(answer)
        except StatusError as error:
            return AuthFailure(error.message)
    return answer


def unauthorized() -> Response:
    """401 for a plugin API called without a token any of its connections accepts."""
    return json_response({"error": "Unauthorized: send a token the connection accepts (kubegate login)"}, 401)


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
