"""Identities from an issuer's signed token claims: the settings of a trusted issuer, the mapping of its
claims to a Kubernetes identity, and the URL rule for what the gateway fetches from it.

Shared by the plugins that accept an issuer's tokens (`oidc`'s bearer tokens, `login`'s browser login),
so a person gets the same user name whichever way their token arrives. Keys and signatures: `jwks.py`.
Names are mapped with prefixes, so names from two issuers cannot collide and no claim can name a
``system:`` user or group.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubegate.core.flow import AuthFailure, Identity
from kubegate.core.headers import names_system_identity

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def check_url(url: str, what: str) -> str:
    """`url` when the gateway may fetch it (https; http only on loopback), else ValueError naming `what`."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return url  # a local test IdP; anything on the network must be https
    raise ValueError(f"{what} must be an https URL (http only on loopback), got {url!r}")


class UsernameMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: str = Field("sub", description="Claim holding the user name.")
    prefix: str | None = Field(None, description="Prepended to the claim; default `ISSUER#`.")


class GroupsMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: str = Field("groups", description="Claim holding the groups (a list or one string).")
    prefix: str = Field("oidc:", description="Prepended to every group.")


class ClaimMappings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: UsernameMapping = Field(default_factory=lambda: UsernameMapping())
    groups: GroupsMapping = Field(default_factory=lambda: GroupsMapping())
    uid: str | None = Field(None, description="Claim sent as Impersonate-Uid.")
    extra: dict[str, str] = Field(default_factory=dict, description="Extra key -> claim name.")

    @field_validator("extra")
    @classmethod
    def _lower_keys(cls, extra: dict[str, str]) -> dict[str, str]:
        for key in extra:
            if not key or key != key.lower():
                raise ValueError(f"extra key {key!r} must be non-empty and lower case")
        return extra


class TokenIssuer(BaseModel):
    """One trusted issuer: how its tokens are checked and how their claims become an identity.

    A subclass may complete itself from a preset (`apply_preset`, before the checks) and grant groups of
    its own instead of the groups claim (`preset_groups`)."""

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field("", description="Must equal the token's `iss`.")
    audiences: list[str] = Field(default_factory=list)
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(ASYMMETRIC_ALGORITHMS))
    leeway_seconds: int = Field(60, ge=0, le=600)
    claim_mappings: ClaimMappings = Field(default_factory=lambda: ClaimMappings())
    required_claims: dict[str, str] = Field(default_factory=dict)
    keep_claims: list[str] = Field(default_factory=list)
    cache_ttl_seconds: int = Field(300, ge=0, le=86400, description="Longest a verified token is cached.")
    jwks_min_refresh_seconds: float = Field(10.0, ge=0, le=3600)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        if not algorithms:
            raise ValueError("at least one algorithm is needed")
        for alg in algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not allowed: only {', '.join(ASYMMETRIC_ALGORITHMS)}"
                    " (no 'none', no shared-secret HS*)"
                )
        return algorithms

    def apply_preset(self) -> None:
        """Fill what a preset implies (issuer, audiences, prefixes, kept claims) before the checks."""

    def preset_groups(self, claims: dict[str, Any]) -> list[str] | None:
        """The groups a preset grants for these (verified) claims; None: the groups claim is mapped."""
        return None

    @model_validator(mode="after")
    def _complete(self) -> TokenIssuer:
        self.apply_preset()
        if not self.issuer:
            raise ValueError("issuer is required")
        check_url(self.issuer, "issuer")
        if self.jwks_url:
            check_url(self.jwks_url, "jwks_url")
        if not self.audiences or not all(self.audiences):
            raise ValueError("audiences: at least one non-empty audience is required")
        if self.claim_mappings.username.prefix is None:
            self.claim_mappings.username.prefix = f"{self.issuer}#"
        if names_system_identity(self.claim_mappings.username.prefix):
            raise ValueError("claim_mappings.username.prefix must not start with system:")
        if names_system_identity(self.claim_mappings.groups.prefix):
            raise ValueError("claim_mappings.groups.prefix must not start with system:")
        return self


def _claim_strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def map_identity(entry: TokenIssuer, claims: dict[str, Any], method: str) -> Identity | AuthFailure:
    """The identity verified `claims` of `entry` name (authenticated by `method`), or why they name none."""
    for name, expected in entry.required_claims.items():
        if name not in claims:
            return AuthFailure(f"missing claim {name}")
        if str(claims[name]) != expected:
            return AuthFailure(f"claim {name} must be {expected!r}")
    mappings = entry.claim_mappings
    subject = claims.get(mappings.username.claim)
    if not isinstance(subject, str) or not subject:
        return AuthFailure(f"missing claim {mappings.username.claim}")
    user = (mappings.username.prefix or "") + subject
    # On the name as the API server will read it (`" system:admin"` arrives as `system:admin`); the spaces
    # themselves are refused where the headers are built.
    if names_system_identity(user):
        return AuthFailure(f"user name {user!r} is not allowed")
    groups: list[str] = []
    kept = {c: claims[c] for c in entry.keep_claims if c in claims}
    preset_groups = entry.preset_groups(claims)
    if preset_groups is not None:
        groups = list(dict.fromkeys(preset_groups))
        for group in groups:
            if names_system_identity(group):  # the preset's config refuses these; never granted anyway
                return AuthFailure(f"group {group!r} is not allowed")
    elif mappings.groups.claim in claims:
        raw = _claim_strings(claims[mappings.groups.claim])
        if raw is None:
            return AuthFailure(f"claim {mappings.groups.claim} must be a string or a list of strings")
        for group in raw:
            if names_system_identity(group):
                return AuthFailure(f"group {group!r} is not allowed")
            mapped = mappings.groups.prefix + group
            if names_system_identity(mapped):
                return AuthFailure(f"group {mapped!r} is not allowed")
            if mapped not in groups:
                groups.append(mapped)
    uid = ""
    if mappings.uid:
        value = claims.get(mappings.uid)
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            return AuthFailure(f"missing claim {mappings.uid}")
        uid = str(value)
    extra: dict[str, tuple[str, ...]] = {}
    for key, claim in mappings.extra.items():
        if claim in claims:
            values = _claim_strings(claims[claim])
            if values is None:
                return AuthFailure(f"claim {claim} must be a string or a list of strings")
            extra[key] = tuple(values)
    return Identity(
        user=user,
        groups=tuple(groups),
        uid=uid,
        extra=extra,
        method=method,
        issuer=entry.issuer,
        claims=kept,
        expires_at=float(claims["exp"]),
    )
