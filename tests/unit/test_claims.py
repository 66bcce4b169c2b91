"""core/claims.py: an issuer's verified claims become an identity; no claim and no preset names a system:
user or group (shared by the oidc plugin and the login plugin's browser login)."""

from __future__ import annotations

from typing import Any

import pytest

from kubegate.core.claims import TokenIssuer, check_url, map_identity
from kubegate.core.flow import AuthFailure, Identity

ISSUER = "https://idp.example"
CLAIMS = {"iss": ISSUER, "sub": "alice", "aud": "kubegate", "exp": 2_000_000_000, "groups": ["dev"]}


class GrantsSystemGroup(TokenIssuer):
    """A preset gone wrong: it grants a system: group whatever its config said."""

    def preset_groups(self, claims: dict[str, Any]) -> list[str] | None:
        return ["ci", "system:masters"]


def test_claims_map_with_prefixes_and_the_method_of_the_plugin_that_accepted_them():
    identity = map_identity(TokenIssuer(issuer=ISSUER, audiences=["kubegate"]), CLAIMS, "oidc")
    assert isinstance(identity, Identity)
    assert identity.user == f"{ISSUER}#alice" and identity.groups == ("oidc:dev",)
    assert identity.method == "oidc" and identity.issuer == ISSUER


def test_a_preset_never_grants_a_system_group():
    refused = map_identity(GrantsSystemGroup(issuer=ISSUER, audiences=["kubegate"]), CLAIMS, "oidc")
    assert isinstance(refused, AuthFailure) and "system:masters" in refused.reason


def test_a_preset_replaces_the_groups_claim_and_names_each_group_once():
    class Preset(TokenIssuer):
        def preset_groups(self, claims: dict[str, Any]) -> list[str] | None:
            return ["ci", "deploy", "ci"]

    identity = map_identity(Preset(issuer=ISSUER, audiences=["kubegate"]), CLAIMS, "oidc")
    assert isinstance(identity, Identity) and identity.groups == ("ci", "deploy")


@pytest.mark.parametrize("claims", [{**CLAIMS, "sub": ""}, {**CLAIMS, "groups": ["system:masters"]}])
def test_claims_that_would_name_nobody_or_a_system_group_are_refused(claims):
    assert isinstance(
        map_identity(TokenIssuer(issuer=ISSUER, audiences=["kubegate"]), claims, "oidc"), AuthFailure
    )


AS_IS = {"username": {"claim": "email", "prefix": ""}, "groups": {"prefix": ""}}


@pytest.mark.parametrize(
    "claims",
    [
        {**CLAIMS, "email": "a@x", "groups": [" system:masters"]},
        {**CLAIMS, "email": "a@x", "groups": ["\tsystem:masters"]},
        {**CLAIMS, "email": " system:admin"},
    ],
    ids=["group-leading-space", "group-leading-tab", "user-leading-space"],
)
def test_a_system_name_behind_spaces_is_refused_as_the_api_server_would_read_it(claims):
    """The API server reads `" system:masters"` from Impersonate-Group as `system:masters`: the check is on
    that form, with the documented reason."""
    refused = map_identity(
        TokenIssuer(issuer=ISSUER, audiences=["kubegate"], claim_mappings=AS_IS), claims, "oidc"
    )
    assert (
        isinstance(refused, AuthFailure) and "system:" in refused.reason and "not allowed" in refused.reason
    )


@pytest.mark.parametrize("url", ["http://idp.example", "ftp://idp.example", "https://", "idp.example"])
def test_only_https_or_loopback_http_is_fetched(url):
    with pytest.raises(ValueError, match="must be an https URL"):
        check_url(url, "issuer")
    assert check_url("http://127.0.0.1:5556", "issuer") == "http://127.0.0.1:5556"
