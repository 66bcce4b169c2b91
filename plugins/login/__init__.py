"""The `login` plugin: browser login (OIDC authorization code, SAML 2.0) for `kubegate login`, and the
short-lived gateway tokens it mints, checked on every connection that enables the plugin.

Gateway-wide settings (`plugins.login`: providers, lifetimes) configure the login; per connection,
`connections.NAME.plugins.login` accepts the tokens there. Tokens are stored hashed in the gateway's
database, listed and revoked with `kubegate tokens`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydantic import BaseModel

from kubegate.core.flow import AuthFailure, Flow, Identity
from kubegate.core.plugins import hookimpl

from .service import LoginService
from .settings import LoginConnectionSettings, LoginSettings
from .store import TOKEN_PREFIX

if TYPE_CHECKING:
    from quart import Blueprint

    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "login"
log = logging.getLogger("kubegate.login")


def service_of(gateway: Gateway) -> LoginService:
    """The gateway's login service, made on first use (routes are built before startup)."""
    service = gateway.extensions.get(PLUGIN_NAME)
    if service is None:
        service = LoginService(gateway.database, gateway.settings_for(PLUGIN_NAME), gateway.public_url)
        gateway.extensions[PLUGIN_NAME] = service
    return service


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return LoginSettings


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return LoginConnectionSettings


@hookimpl
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    if gateway.settings_for(PLUGIN_NAME) is None:
        return None
    from .routes import make_blueprint

    return make_blueprint(gateway, service_of(gateway))


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    if gateway.settings_for(PLUGIN_NAME) is None and not any(
        PLUGIN_NAME in c.enabled_plugins for c in gateway.connections
    ):
        return
    service = service_of(gateway)
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            settings: LoginConnectionSettings = connection.settings_for(PLUGIN_NAME)
            settings._service = service
            unknown = set(settings.providers or ()) - {p.name for p in service.settings.providers}
            if unknown:
                log.warning(
                    "connection %s: login providers %s are not configured", connection.name, sorted(unknown)
                )


@hookimpl
async def kubegate_authenticate(flow: Flow) -> Identity | AuthFailure | None:
    token = flow.request.bearer_token
    if token is None or not token.startswith(TOKEN_PREFIX):
        return None
    settings: LoginConnectionSettings = flow.connection.settings_for(PLUGIN_NAME)
    return await settings._service.check(token, flow.connection.name, settings)


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    service = gateway.extensions.pop(PLUGIN_NAME, None)
    if service is not None:
        await service.close()
