"""HTTP routes of the login plugin: the browser pages, the provider callbacks and the JSON API the
`kubegate` CLI uses (start a login, collect its token, exchange a CI token, log out)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, redirect, request

from kubegate.core.flow import AuthFailure
from kubegate.core.routes import NO_STORE, authenticate_caller, json_response

from . import pages, store
from .oidc_flow import LoginError
from .service import CollectError, LoginService

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

HEX64 = re.compile(r"^[0-9a-f]{64}$")
UI_LOGIN = "kubegate web UI"  # the description of logins the web UI starts (kubegate.ui.plugin)
UI_LOGIN_COOKIE = "kubegate_ui_login"  # LOGIN_ID.VERIFIER, set by the web UI in the browser that starts
# The pages load nothing and run no script: inline styles are all they need.
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _html(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def _error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


async def _json_body() -> dict[str, Any]:
    body = await request.get_json(force=True, silent=True)
    return body if isinstance(body, dict) else {}


def _bearer() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _finished(service: LoginService, fields: dict[str, Any]) -> Response:
    """After the identity provider: a login the web UI started goes back to it (it collects the token with
    the secret in its cookie); a `kubegate login` shows the page that says the terminal goes on.

    A UI login must end in the browser that started it: someone who forwards the identity provider's link
    to another person would otherwise collect a token in that person's name."""
    if fields.get("started_by") == UI_LOGIN:
        started_here = request.cookies.get(UI_LOGIN_COOKIE, "").partition(".")[0] == fields["login_id"]
        if not started_here:
            await service.abandon(fields["login_id"], "the login ended in another browser than it started in")
            return _html(pages.failed("this login was started in another browser: start again here"), 400)
        return redirect(f"/ui/login/finish?request={fields['login_id']}")  # type: ignore[return-value]
    return _html(pages.logged_in(fields["user"], fields["groups"]))


def make_blueprint(gateway: Gateway, service: LoginService) -> Blueprint:
    bp = Blueprint("login", __name__)
    providers = [(p.name, p.title) for p in service.settings.providers]

    @bp.get("/login")
    async def login_page() -> Response:
        login_id = request.args.get("request", "")
        if not login_id:
            return _html(pages.start_from_cli(providers))
        try:
            login = await service.pending_login(login_id)
        except LoginError as exc:
            return _html(pages.failed(str(exc)), 400)
        return _html(
            pages.choose_provider(login.id, login.user_code, providers, int(login.expires_at - time.time()))
        )

    @bp.get("/login/start/<provider>")
    async def start(provider: str) -> Response:
        try:
            url = await service.begin(request.args.get("request", ""), provider)
        except LoginError as exc:
            return _html(pages.failed(str(exc)), 400)
        return redirect(url)  # type: ignore[return-value]

    @bp.get("/login/oidc/callback")
    async def oidc_callback() -> Response:
        args = request.args
        error = ": ".join(
            filter(None, [args.get("error", "")[:100], args.get("error_description", "")[:300]])
        )
        try:
            fields = await service.finish_oidc(args.get("state", ""), args.get("code", ""), error)
        except LoginError as exc:
            return _html(pages.failed(str(exc)), 400)
        return await _finished(service, fields)

    @bp.get("/login/saml/<provider>")
    async def saml_metadata(provider: str) -> Response:
        saml = service.saml.get(provider)
        if saml is None:
            return _html(pages.failed(f"no SAML provider {provider!r}"), 404)
        return Response(saml.metadata(), content_type="application/samlmetadata+xml")

    @bp.post("/login/saml/<provider>/acs")
    async def saml_acs(provider: str) -> Response:
        form = {k: v for k, v in (await request.form).items()}
        try:
            fields = await service.finish_saml(provider, form)
        except LoginError as exc:
            return _html(pages.failed(str(exc)), 400)
        return await _finished(service, fields)

    # -- JSON API for the CLI ----------------------------------------------------------------------------

    @bp.post("/login/cli")
    async def cli_start() -> Response:
        body = await _json_body()
        challenge = str(body.get("code_challenge", ""))
        if not HEX64.match(challenge):
            return _error(400, "code_challenge must be the SHA-256 (hex) of a random secret")
        connection = body.get("connection")
        if connection is not None and gateway.connections.get(str(connection)) is None:
            return _error(404, f"no connection {connection!r} on this gateway")
        if not service.settings.providers:
            return _error(501, "this gateway has no login providers (plugins.login in its config)")
        description = str(body.get("description", ""))[:200]
        # Stores nothing (a signed ticket): any number of starts from anyone refuses no one.
        login = await service.start_cli_login(challenge, connection, description)
        return json_response(
            {
                "login_id": login.id,
                "login_url": f"{service.public_url}/login?request={login.id}",
                "user_code": login.user_code,
                "expires_at": login.expires_at,
                "interval": 1,
            }
        )

    @bp.post("/login/cli/token")
    async def cli_token() -> Response:
        body = await _json_body()
        try:
            token, summary = await service.collect(
                str(body.get("login_id", "")), str(body.get("code_verifier", ""))
            )
        except CollectError as exc:
            return json_response(
                {"status": "pending"} if exc.status == 202 else {"error": exc.message}, exc.status
            )
        return json_response({"token": token, **summary})

    @bp.post("/login/exchange")
    async def exchange() -> Response:
        if not service.settings.allow_exchange:
            return _error(403, "token exchange is not enabled on this gateway (plugins.login.allow_exchange)")
        body = await _json_body()
        name = str(body.get("connection", ""))
        connection = gateway.connections.get(name)
        if connection is None:
            return _error(404, f"no connection {name!r} on this gateway")
        if _bearer() is None:
            return _error(401, "send the token to exchange as Authorization: Bearer")
        identity = await authenticate_caller(connection)
        if isinstance(identity, AuthFailure):
            return _error(401, f"Unauthorized: {identity.reason}")
        if identity is None:
            return _error(401, "Unauthorized: no plugin of this connection accepts the token")
        if identity.method.startswith("login:"):
            return _error(400, "this is already a gateway token")
        token, summary = await service.exchange(identity, name, request.headers.get("User-Agent", ""))
        return json_response({"token": token, **summary})

    @bp.post("/login/logout")
    async def logout() -> Response:
        token = _bearer()
        if token is None or not token.startswith(store.TOKEN_PREFIX):
            return _error(400, "send the gateway token to revoke as Authorization: Bearer")
        revoked = await service.revoke_presented(token)
        return json_response({"revoked": [r.id for r in revoked]})

    return bp
