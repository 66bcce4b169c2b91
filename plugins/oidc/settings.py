"""The `oidc` plugin's settings: per connection, the trusted issuers (`core/claims.py`'s issuer settings,
plus the GitHub Actions preset) and the size of the verified-token cache."""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kubegate.core.claims import TokenIssuer
from kubegate.core.config import private
from kubegate.core.issuer_tokens import Verifier

from .github import GITHUB_ACTIONS_ISSUER, GITHUB_KEPT_CLAIMS, GitHubActionsPreset

PLUGIN_NAME = "oidc"


class IssuerSettings(TokenIssuer):
    github_actions: GitHubActionsPreset | None = None

    def apply_preset(self) -> None:
        preset = self.github_actions
        if preset is None:
            return
        self.issuer = self.issuer or GITHUB_ACTIONS_ISSUER
        self.audiences = self.audiences or [preset.audience]
        if preset.audience not in self.audiences:
            raise ValueError("github_actions.audience must be one of audiences")
        if self.claim_mappings.username.prefix is None:
            github_com = self.issuer == GITHUB_ACTIONS_ISSUER
            self.claim_mappings.username.prefix = "github:" if github_com else f"{self.issuer}#"
        for claim in GITHUB_KEPT_CLAIMS:
            if claim not in self.keep_claims:
                self.keep_claims.append(claim)

    def preset_groups(self, claims: dict[str, Any]) -> list[str] | None:
        return None if self.github_actions is None else self.github_actions.groups_for(claims)


class OIDCSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuers: list[IssuerSettings] = Field(min_length=1)
    max_cached_tokens: int = Field(10000, ge=0, le=1_000_000)
    _verifier: Verifier = PrivateAttr()

    @model_validator(mode="after")
    def _build(self) -> OIDCSettings:
        seen: dict[str, IssuerSettings] = {}
        for entry in self.issuers:
            if entry.issuer in seen:
                raise ValueError(f"issuer {entry.issuer!r} is listed twice")
            seen[entry.issuer] = entry
        prefixes = [(e.issuer, e.claim_mappings.username.prefix or "") for e in self.issuers]
        for issuer, prefix in prefixes:
            for other, other_prefix in prefixes:
                if issuer != other and other_prefix.startswith(prefix):
                    raise ValueError(
                        f"user name prefix {prefix!r} of {issuer} overlaps {other_prefix!r} of {other}:"
                        " names from the two issuers could collide"
                    )
        # Built once per config load; all caches live here, per connection.
        self._verifier = Verifier(self.issuers, self.max_cached_tokens, PLUGIN_NAME)
        return self

    @property
    def verifier(self) -> Verifier:
        return cast(Verifier, private(self, "_verifier"))  # on every request: not self._verifier
