"""``oidc``: bearer JWTs (OIDC ID tokens, GitHub Actions job tokens) verified against an issuer's keys.

Per connection, a list of trusted issuers (`settings.py`; the GitHub Actions preset: `github.py`). A token
is this plugin's when it looks like a JWT and its (unverified) ``iss`` names a configured issuer; it is
then verified with that issuer's JWKS and its claims checked and mapped to an identity by core's shared
issuer-token code (`kubegate.core.issuer_tokens`, `.jwks`, `.claims`: the `login` plugin's browser login
checks its ID tokens with the same code). See docs/identity.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kubegate.core import hookimpl
from kubegate.core.claims import ClaimMappings, GroupsMapping, UsernameMapping, check_url
from kubegate.core.claims import map_identity as map_claims
from kubegate.core.flow import AuthFailure, Flow, Identity
from kubegate.core.issuer_tokens import Verifier
from kubegate.core.jwks import FETCH_TIMEOUT_SECONDS, IssuerKeys, KeyFetchError

from .github import GitHubActionsPreset, GitHubMatch, GitHubRule
from .settings import PLUGIN_NAME, IssuerSettings, OIDCSettings

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

__all__ = [
    "FETCH_TIMEOUT_SECONDS",
    "PLUGIN_NAME",
    "ClaimMappings",
    "GitHubActionsPreset",
    "GitHubMatch",
    "GitHubRule",
    "GroupsMapping",
    "IssuerKeys",
    "IssuerSettings",
    "KeyFetchError",
    "OIDCSettings",
    "UsernameMapping",
    "Verifier",
    "check_url",
    "map_identity",
]


def map_identity(entry: IssuerSettings, claims: dict[str, Any]) -> Identity | AuthFailure:
    """The identity an issuer's verified claims name, as this plugin maps them."""
    return map_claims(entry, claims, PLUGIN_NAME)


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return OIDCSettings


@hookimpl
async def kubegate_authenticate(flow: Flow) -> Identity | AuthFailure | None:
    token = flow.request.bearer_token
    if token is None:
        return None
    settings: OIDCSettings = flow.connection.settings_for(PLUGIN_NAME)
    return await settings.verifier.authenticate(token)


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    for connection in gateway.connections:
        settings = connection.settings_for(PLUGIN_NAME)
        if isinstance(settings, OIDCSettings):
            await settings.verifier.close()
