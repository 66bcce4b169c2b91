"""The GitHub Actions preset of an issuer: a workflow's job token (issuer, audience, the claims kept) and the
groups its repository earns by rules that match immutable ids (names can be reused)."""

from __future__ import annotations

import fnmatch
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubegate.core.headers import names_system_identity

GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"
GITHUB_ACTIONS_GROUP = "github-actions"
GITHUB_KEPT_CLAIMS = (
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "ref",
    "sha",
    "environment",
    "job_workflow_ref",
    "workflow",
    "event_name",
    "actor",
    "run_id",
)


class GitHubMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository_id: str | None = None
    repository_owner_id: str | None = None
    repository: str | None = None
    ref: str | None = None
    environment: str | None = None
    job_workflow_ref: str | None = None
    event_name: str | None = None

    @field_validator("repository_id", "repository_owner_id", mode="before")
    @classmethod
    def _numeric(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    def matches(self, claims: dict[str, Any]) -> bool:
        for name, pattern in self.model_dump(exclude_none=True).items():
            value = claims.get(name)
            if not isinstance(value, str | int) or not fnmatch.fnmatchcase(str(value), pattern):
                return False
        return True


class GitHubRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: GitHubMatch
    groups: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> GitHubRule:
        if not self.match.repository_id and not self.match.repository_owner_id:
            raise ValueError("a rule must match repository_id or repository_owner_id (names can be reused)")
        for group in self.groups:
            if names_system_identity(group):
                raise ValueError(f"group {group!r}: system: groups cannot be granted")
        return self


class GitHubActionsPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audience: str = Field(min_length=1, description="The audience the workflow requests its token for.")
    rules: list[GitHubRule] = Field(default_factory=list)

    def groups_for(self, claims: dict[str, Any]) -> list[str]:
        """`github-actions`, then the groups of every rule the (verified) claims match."""
        groups = [GITHUB_ACTIONS_GROUP]
        for rule in self.rules:
            if rule.match.matches(claims):
                groups.extend(g for g in rule.groups if g not in groups)
        return groups
