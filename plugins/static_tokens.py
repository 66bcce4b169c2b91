"""``static-tokens``: bearer tokens listed in the config, stored only as SHA-256 hashes.

For CI bots and small teams, and to exercise the data path end to end; real identity (OIDC, SAML) comes as
its own plugins on the same hook. ``kubegate static-token --user NAME --group G`` makes a token and the
config entry for it.
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kubegate.core import hookimpl
from kubegate.core.config import private
from kubegate.core.flow import Flow, Identity
from kubegate.core.headers import names_system_identity

PLUGIN_NAME = "static-tokens"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class StaticToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, description="User name sent as Impersonate-User.")
    groups: list[str] = Field(default_factory=list, description="Groups sent as Impersonate-Group.")
    uid: str = ""
    sha256: str = Field(description="Hex SHA-256 of the token (never the token itself).")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.removeprefix("sha256:").lower()
        if not SHA256_HEX.match(value):
            raise ValueError("must be the 64-character hex SHA-256 of the token")
        return value

    @field_validator("groups")
    @classmethod
    def _no_system_groups(cls, groups: list[str]) -> list[str]:
        for group in groups:
            if names_system_identity(group):
                raise ValueError(f"group {group!r}: system: groups cannot be granted by a token")
        return groups


class StaticTokenSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[StaticToken] = Field(default_factory=list)
    _by_hash: dict[str, Identity] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _index(self) -> StaticTokenSettings:
        # Built once per config load: authentication is then one hash and one dict lookup.
        for token in self.tokens:
            if token.sha256 in self._by_hash:
                raise ValueError(f"token of user {token.user!r} is listed twice")
            self._by_hash[token.sha256] = Identity(
                user=token.user, groups=tuple(token.groups), uid=token.uid, method=PLUGIN_NAME
            )
        return self

    def lookup(self, token: str) -> Identity | None:
        by_hash: dict[str, Identity] = private(self, "_by_hash")  # on every request: not self._by_hash
        return by_hash.get(hashlib.sha256(token.encode()).hexdigest())


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return StaticTokenSettings


@hookimpl
def kubegate_authenticate(flow: Flow) -> Identity | None:
    token = flow.request.bearer_token
    if token is None:
        return None
    settings: StaticTokenSettings = flow.connection.settings_for(PLUGIN_NAME)
    return settings.lookup(token)
