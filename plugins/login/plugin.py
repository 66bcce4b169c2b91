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

from kubegate.core.claims import TokenIssuer
from kubegate.core.config import ConfigError, private
from kubegate.core.flow import AuthFailure, Flow, Identity
from kubegate.core.plugins import hookimpl

from .service import LoginService
from .settings import LoginConnectionSettings, LoginSettings, provider_issuer, user_prefix
from .store import TOKEN_PREFIX

if TYPE_CHECKING:
    from quart import Blueprint
    from sqlmodel import SQLModel

    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "login"


@hookimpl
def kubegate_database_models() -> list[type[SQLModel]]:
    from . import store

    return [store.TokenRecord, store.LoginRequest, store.SeenAssertion, store.LoginKey]


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

    try:
        service = service_of(gateway)
    except ValueError as exc:
        raise ConfigError(gateway.config_path, f"plugins.{PLUGIN_NAME}", str(exc)) from None
    return make_blueprint(gateway, service)


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    if gateway.settings_for(PLUGIN_NAME) is None and not any(
        PLUGIN_NAME in c.enabled_plugins for c in gateway.connections
    ):
        return
    service = service_of(gateway)
    _check_prefixes(gateway, service.settings)
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            settings: LoginConnectionSettings = connection.settings_for(PLUGIN_NAME)
            settings._service = service
            unknown = set(settings.providers or ()) - {p.name for p in service.settings.providers}
            if unknown:
                log.warning(
                    "connection %s: login providers %s are not configured", connection.name, sorted(unknown)
                )


def _check_prefixes(gateway: Gateway, settings: LoginSettings) -> None:
    """A login provider's user names must not be able to collide with an `oidc` issuer's on any connection.

    The `oidc` plugin's settings are read by their shape (`issuers`, each core's `TokenIssuer`), not by
    importing that plugin: plugins do not import each other."""
    for connection in gateway.connections:
        if PLUGIN_NAME not in connection.enabled_plugins:
            continue
        oidc_issuers = getattr(connection.settings_for("oidc"), "issuers", None) or ()
        issuers = [entry for entry in oidc_issuers if isinstance(entry, TokenIssuer)]
        for provider in settings.providers:
            prefix, issuer = user_prefix(provider), provider_issuer(provider)
            for entry in issuers:
                other = entry.claim_mappings.username.prefix or ""
                if entry.issuer != issuer and (other.startswith(prefix) or prefix.startswith(other)):
                    raise ConfigError(
                        gateway.config_path,
                        f"plugins.login.providers.{provider.name}",
                        f"user name prefix {prefix!r} overlaps {other!r} of oidc issuer {entry.issuer} on"
                        f" connection {connection.name}: names from the two could collide",
                    )


@hookimpl
async def kubegate_authenticate(flow: Flow) -> Identity | AuthFailure | None:
    token = flow.request.bearer_token
    if token is None or not token.startswith(TOKEN_PREFIX):
        return None
    settings: LoginConnectionSettings = flow.connection.settings_for(PLUGIN_NAME)
    service: LoginService = private(settings, "_service")  # attached at startup
    return await service.check(token, flow.connection.name, settings)


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    service = gateway.extensions.pop(PLUGIN_NAME, None)
    if service is not None:
        await service.close()
