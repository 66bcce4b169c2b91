"""The `ui` plugin: the reviewers' and auditors' web UI at `/ui/`, served by the gateway itself.

People log in through the `login` plugin's identity providers (OIDC authorization code, SAML); the gateway
token that login mints is kept in an HttpOnly, Secure, SameSite=Strict cookie, and the JSON APIs of the
other plugins (approvals, grants, audit, sessions) accept it in place of a bearer token — with a CSRF token
on every state-changing request (`core/routes.py`). Pages are HTML shells plus one script (`static/app.js`)
that calls those APIs; every asset is served from here (no external network). Gateway-wide settings:
`plugins.ui` (`admins`). See docs/ui.md.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response, redirect, request, send_from_directory

from kubegate.core.flow import Identity
from kubegate.core.plugins import hookimpl
from kubegate.core.routes import SESSION_COOKIE, caller_identities, csrf_token_for, json_response
from kubegate.plugins.login.routes import UI_LOGIN
from kubegate.plugins.login.routes import UI_LOGIN_COOKIE as LOGIN_COOKIE

from . import pages

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "ui"
STATIC = Path(__file__).parent / "static"


class UISettings(BaseModel):
    """Gateway-wide: `plugins.ui` (optional; the UI is on wherever `plugins.login` has providers)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve the web UI at /ui/.")
    admins: list[str] = Field(
        default_factory=list,
        description="Groups that see and revoke every grant and see every connection's policy summary.",
    )


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return UISettings


def settings_of(gateway: Gateway) -> UISettings:
    found = gateway.settings_for(PLUGIN_NAME)
    return found if isinstance(found, UISettings) else UISettings()


@hookimpl
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    if not settings_of(gateway).enabled:
        return None
    return make_blueprint(gateway)


def roles_of(gateway: Gateway, groups: set[str]) -> dict[str, bool]:
    """What a person may do in the UI, from their groups and the other plugins' settings."""
    reviewer_groups: set[str] = set()
    for connection in gateway.connections:
        policy = connection.settings_for("policy") if "policy" in connection.enabled_plugins else None
        for rule in getattr(policy, "rules", None) or []:
            approval = getattr(rule, "approval", None)
            reviewer_groups |= set(getattr(approval, "reviewer_groups", None) or [])
    readers: set[str] = set()
    for plugin in ("audit-db", "recording"):
        settings = gateway.settings_for(plugin)
        readers |= set(getattr(settings, "readers", None) or ([] if settings else ["kubegate:auditors"]))
    return {
        "reviewer": bool(groups & reviewer_groups),
        "auditor": bool(groups & readers),
        "admin": bool(groups & set(settings_of(gateway).admins)),
    }


def make_blueprint(gateway: Gateway) -> Blueprint:
    bp = Blueprint("ui", __name__)

    async def who() -> dict[str, Identity]:
        return await caller_identities(list(gateway.connections))

    def login_service() -> Any:
        if gateway.settings_for("login") is None:
            return None
        from kubegate.plugins.login.plugin import service_of

        return service_of(gateway)

    async def page(name: str, title: str, **data: str) -> Response:
        identities = await who()
        if not identities:
            return redirect("/ui/login")  # type: ignore[return-value]
        identity = next(iter(identities.values()))
        token = request.cookies.get(SESSION_COOKIE, "")
        body = pages.shell(name, title, identity, csrf_token_for(token) if token else "", data)
        return pages.html(body)

    @bp.get("/ui")
    async def root() -> Response:
        return redirect("/ui/")  # type: ignore[return-value]

    @bp.get("/ui/")
    async def inbox() -> Response:
        return await page("inbox", "Approvals")

    @bp.get("/ui/approvals/<approval_id>")
    async def approval(approval_id: str) -> Response:
        return await page("approval", "Approval request", approval=approval_id)

    @bp.get("/ui/grants")
    async def grants() -> Response:
        return await page("grants", "Grants")

    @bp.get("/ui/audit")
    async def audit() -> Response:
        return await page("audit", "Audit")

    @bp.get("/ui/sessions")
    async def sessions() -> Response:
        return await page("sessions", "Sessions")

    @bp.get("/ui/sessions/<session_id>")
    async def session(session_id: str) -> Response:
        return await page("session", "Session replay", session=session_id)

    @bp.get("/ui/connections")
    async def connections() -> Response:
        return await page("connections", "Connections")

    @bp.get("/ui/static/<path:name>")
    async def static(name: str) -> Response:
        response = await send_from_directory(STATIC, name)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # -- login and logout -------------------------------------------------------------------------------

    @bp.get("/ui/login")
    async def login_page() -> Response:
        service = login_service()
        providers = [(p.name, p.title) for p in service.settings.providers] if service else []
        return pages.html(pages.login(providers, request.args.get("error", "")))

    @bp.get("/ui/login/start/<provider>")
    async def login_start(provider: str) -> Response:
        service = login_service()
        if service is None:
            return pages.html(pages.login([], "no identity providers are configured (plugins.login)"), 404)
        from kubegate.plugins.login.oidc_flow import LoginError

        verifier = secrets.token_urlsafe(32)
        challenge = hashlib.sha256(verifier.encode()).hexdigest()
        pending = await service.start_cli_login(challenge, None, UI_LOGIN)
        try:
            url = await service.begin(pending.id, provider)
        except LoginError as exc:
            return pages.html(pages.login([], str(exc)), 400)
        response: Response = redirect(url)  # type: ignore[assignment]
        # SameSite=None: it must come back with the identity provider's answer, which is a cross-site
        # navigation — a GET redirect (OIDC) or a POSTed form (SAML), and Lax cookies skip the latter. It
        # only proves which browser started this login; the session cookie is Strict.
        response.set_cookie(LOGIN_COOKIE, f"{pending.id}.{verifier}", max_age=service.settings.login_timeout_seconds,
                            secure=True, httponly=True, samesite="None", path="/")  # fmt: skip
        return response

    @bp.get("/ui/login/finish")
    async def login_finish() -> Response:
        service = login_service()
        login_id, _, verifier = request.cookies.get(LOGIN_COOKIE, "").partition(".")
        if service is None or not login_id or login_id != request.args.get("request"):
            return pages.html(pages.login([], "this login was not started in this browser: start again"), 400)
        from kubegate.plugins.login.service import CollectError

        try:
            token, summary = await service.collect(login_id, verifier)
        except CollectError as exc:
            return pages.html(pages.login([], exc.message), exc.status if exc.status >= 400 else 400)
        # A page of our own moves on to /ui/: a Strict cookie set during a navigation that came from the
        # identity provider's site is not sent until a navigation that starts here.
        response = pages.html(pages.moving_on("/ui/"))
        response.set_cookie(SESSION_COOKIE, token, max_age=max(60, int(summary["expires_at"] - time.time())),
                            secure=True, httponly=True, samesite="Strict", path="/")  # fmt: skip
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    @bp.post("/ui/logout")
    async def logout() -> Response:
        token = request.cookies.get(SESSION_COOKIE, "")
        form = await request.form
        if token and secrets.compare_digest(str(form.get("csrf", "")), csrf_token_for(token)):
            service = login_service()
            if service is not None and token.startswith("kgt_"):
                await service.revoke_presented(token)
        elif token:
            return pages.html(pages.login([], "log out from the page's own button (CSRF check failed)"), 403)
        response: Response = redirect("/ui/login")  # type: ignore[assignment]
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- small JSON APIs of the UI's own ----------------------------------------------------------------

    @bp.get("/api/me")
    async def me() -> Response:
        identities = await who()
        if not identities:
            return json_response({"error": "Unauthorized"}, 401)
        identity = next(iter(identities.values()))
        groups = {g for i in identities.values() for g in i.groups}
        return json_response({"user": identity.user, "person": identity.person, "groups": sorted(groups),
                              "method": identity.method, "connections": sorted(identities),
                              "roles": roles_of(gateway, groups)})  # fmt: skip

    @bp.get("/api/connections")
    async def connection_list() -> Response:
        identities = await who()
        if not identities:
            return json_response({"error": "Unauthorized"}, 401)
        groups = {g for i in identities.values() for g in i.groups}
        admin = roles_of(gateway, groups)["admin"]
        items = []
        for connection in gateway.connections:
            if connection.name not in identities and not admin:
                continue
            status = getattr(connection.upstream, "status", None)  # e.g. an agent tunnel's agents
            items.append({"name": connection.name, "description": connection.description,
                          "type": connection.type, "upstream": status() if status else None,
                          "plugins": sorted(connection.enabled_plugins),
                          "policy": policy_summary(connection.settings_for("policy"))
                          if "policy" in connection.enabled_plugins else None})  # fmt: skip
        return json_response({"items": items})

    return bp


def policy_summary(settings: Any) -> dict[str, Any] | None:
    if settings is None:
        return None
    rules = []
    for rule in getattr(settings, "rules", []) or []:
        match = (
            rule.match.model_dump(exclude_defaults=True) if getattr(rule, "match", None) is not None else {}
        )
        rules.append({"name": rule.name, "action": str(rule.action), "message": getattr(rule, "message", ""),
                      "match": match})  # fmt: skip
    return {"default": str(getattr(settings, "default", "")), "rules": rules}
