"""Settings of the `login` plugin: gateway-wide (providers, token lifetimes) and per connection."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kubegate.core.claims import TokenIssuer
from kubegate.core.headers import names_system_identity

PROVIDER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOUR = 3600


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{what} {path} is empty")
    return value


class OIDCLoginProvider(TokenIssuer):
    """Browser login at an OpenID Connect provider (authorization code flow with PKCE).

    Inherits the token checks and claim mappings of the `oidc` plugin's issuers (core's `TokenIssuer`), so
    a person gets the same Kubernetes user name whether they log in here or present an ID token directly.
    """

    type: Literal["oidc"]
    name: str = Field(description="Shown in URLs and token listings; a DNS label.")
    title: str = Field("", description="Button label on the login page.")
    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(None, description="Prefer `client_secret_file`.")
    client_secret_file: Path | None = None
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    authorize_params: dict[str, str] = Field(
        default_factory=dict, description="Extra query parameters for the authorization request."
    )

    @model_validator(mode="before")
    @classmethod
    def _audience_is_client(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("audiences") and data.get("client_id"):
            data = {**data, "audiences": [data["client_id"]]}
        if isinstance(data, dict) and data.get("github_actions"):
            raise ValueError("github_actions is for CI tokens (the oidc plugin), not for browser login")
        return data

    @field_validator("client_secret_file")
    @classmethod
    def _resolve_secret(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        value = value if value.is_absolute() else (_base_dir(info) / value).resolve()
        # Read at every login (a rotated secret needs no restart), and once here: a missing or empty file
        # is a one-line error when the config loads, not a failed login later.
        _read_secret(value, "client_secret_file")
        return value

    @field_validator("scopes")
    @classmethod
    def _openid(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("must include 'openid'")
        return scopes

    def secret(self) -> str | None:
        if self.client_secret_file is not None:
            return _read_secret(self.client_secret_file, "client_secret_file")
        return self.client_secret


class SAMLLoginProvider(BaseModel):
    """Browser login at a SAML 2.0 identity provider (SP-initiated, HTTP-Redirect → HTTP-POST)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["saml"]
    name: str
    title: str = ""
    idp_metadata_file: Path | None = Field(None, description="The IdP's metadata XML.")
    idp_entity_id: str | None = None
    idp_sso_url: str | None = None
    idp_certificate_file: Path | None = Field(None, description="The IdP's signing certificate (PEM).")
    sp_entity_id: str | None = Field(
        None, description="Default: the metadata URL, PUBLIC_URL/login/saml/NAME."
    )
    username_attribute: str | None = Field(
        None, description="Attribute holding the user name; default NameID."
    )
    username_prefix: str | None = Field(None, description="Default `IDP_ENTITY_ID#`.")
    groups_attribute: str = "groups"
    groups_prefix: str = "saml:"
    keep_attributes: list[str] = Field(default_factory=list, description="Kept in the identity's claims.")
    max_assertion_age_seconds: int = Field(300, ge=30, le=3600)
    _idp: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("idp_metadata_file", "idp_certificate_file")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        return value if value.is_absolute() else (_base_dir(info) / value).resolve()

    @model_validator(mode="after")
    def _check(self) -> SAMLLoginProvider:
        explicit = (self.idp_entity_id, self.idp_sso_url, self.idp_certificate_file)
        if self.idp_metadata_file is None and not all(explicit):
            raise ValueError("give idp_metadata_file, or idp_entity_id + idp_sso_url + idp_certificate_file")
        for prefix in (self.username_prefix or "", self.groups_prefix):
            if names_system_identity(prefix):
                raise ValueError("prefixes must not start with system:")
        from .saml_flow import read_idp  # python3-saml loads xmlsec: only when SAML is configured

        self._idp = read_idp(self)
        self.idp_entity_id = self._idp["entityId"]
        self.idp_sso_url = self._idp["singleSignOnService"]["url"]
        return self

    @property
    def idp(self) -> dict[str, Any]:
        """The IdP as python3-saml wants it (entity ID, SSO URL, certificate), read at config load."""
        return self._idp


Provider = Annotated[OIDCLoginProvider | SAMLLoginProvider, Field(discriminator="type")]


class LoginSettings(BaseModel):
    """Gateway-wide: `plugins.login` at the top of the config."""

    model_config = ConfigDict(extra="forbid")

    providers: list[Provider] = Field(min_length=1)
    token_ttl_seconds: int = Field(8 * HOUR, ge=60, le=30 * 24 * HOUR)
    login_timeout_seconds: int = Field(600, ge=30, le=3600)
    allow_exchange: bool = Field(False, description="CI may trade an accepted token for a gateway token.")
    exchange_token_ttl_seconds: int = Field(HOUR, ge=60, le=30 * 24 * HOUR)
    revocation_check_seconds: float = Field(
        1.0, ge=0, le=60, description="How long a token check is reused before the database is asked again."
    )

    @model_validator(mode="after")
    def _unique(self) -> LoginSettings:
        seen: set[str] = set()
        prefixes = [(p.name, user_prefix(p)) for p in self.providers]
        for name, prefix in prefixes:
            for other, other_prefix in prefixes:
                if (
                    name != other
                    and other_prefix.startswith(prefix)
                    and provider_issuer(self.provider(name)) != provider_issuer(self.provider(other))
                ):
                    raise ValueError(
                        f"user name prefix {prefix!r} of provider {name} overlaps {other_prefix!r} of {other}:"
                        " names from the two identity providers could collide"
                    )
        for provider in self.providers:
            if not PROVIDER_NAME.match(provider.name):
                raise ValueError(f"provider name {provider.name!r} must be a DNS label")
            if provider.name in seen:
                raise ValueError(f"provider {provider.name!r} is listed twice")
            seen.add(provider.name)
        return self

    def provider(self, name: str) -> OIDCLoginProvider | SAMLLoginProvider | None:
        return next((p for p in self.providers if p.name == name), None)


def provider_issuer(provider: OIDCLoginProvider | SAMLLoginProvider | None) -> str:
    if isinstance(provider, OIDCLoginProvider):
        return provider.issuer
    return provider.idp_entity_id or "" if provider else ""


def user_prefix(provider: OIDCLoginProvider | SAMLLoginProvider) -> str:
    """What every user name from this provider starts with (the rule that keeps issuers apart)."""
    if isinstance(provider, OIDCLoginProvider):
        return provider.claim_mappings.username.prefix or f"{provider.issuer}#"
    if provider.username_prefix is not None:
        return provider.username_prefix
    return f"{provider.idp_entity_id}#"


class LoginConnectionSettings(BaseModel):
    """Per connection: `connections.NAME.plugins.login` accepts gateway tokens there."""

    model_config = ConfigDict(extra="forbid")

    providers: list[str] | None = Field(
        None, description="Accept tokens from these login providers only (default: all)."
    )
    allow_exchanged: bool = Field(
        True, description="Accept tokens minted by an exchange for this connection."
    )
    # The gateway's LoginService, attached at startup.
    _service: Any = PrivateAttr(None)
