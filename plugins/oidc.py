"""``oidc``: bearer JWTs (OIDC ID tokens, GitHub Actions job tokens) verified against an issuer's keys.

Per connection, a list of trusted issuers. A token is this plugin's when it looks like a JWT and its
(unverified) ``iss`` names a configured issuer; it is then verified with that issuer's JWKS (discovered or
configured, cached, refreshed once on an unknown ``kid``: single-flight and rate-limited) and its claims are
checked (``iss``, ``aud``, ``exp`` essential, ``nbf``/``iat`` with leeway). The identity is mapped from
claims with prefixes, so names from two issuers cannot collide and no claim can name a ``system:`` user or
group. Verified tokens are cached by SHA-256 until they expire (bounded LRU): a repeated token costs one
hash and one dict lookup. See docs/identity.md.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kubegate.core import hookimpl
from kubegate.core.flow import AuthFailure, Flow, Identity, token_fingerprint

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "oidc"
log = logging.getLogger(__name__)

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
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_KEYS_TTL = 300.0
MIN_KEYS_TTL = 60.0
MAX_KEYS_TTL = 86400.0
FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return url  # a local test IdP; anything on the network must be https
    raise ValueError(f"{what} must be an https URL (http only on loopback), got {url!r}")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


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
            if group.startswith("system:"):
                raise ValueError(f"group {group!r}: system: groups cannot be granted")
        return self


class GitHubActionsPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audience: str = Field(min_length=1, description="The audience the workflow requests its token for.")
    rules: list[GitHubRule] = Field(default_factory=list)


class IssuerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuer: str = Field("", description="Must equal the token's `iss`.")
    audiences: list[str] = Field(default_factory=list)
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(ASYMMETRIC_ALGORITHMS))
    leeway_seconds: int = Field(60, ge=0, le=600)
    claim_mappings: ClaimMappings = Field(default_factory=lambda: ClaimMappings())
    required_claims: dict[str, str] = Field(default_factory=dict)
    keep_claims: list[str] = Field(default_factory=list)
    github_actions: GitHubActionsPreset | None = None
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

    @model_validator(mode="after")
    def _complete(self) -> IssuerSettings:
        preset = self.github_actions
        if preset is not None:
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
        if not self.issuer:
            raise ValueError("issuer is required")
        _check_url(self.issuer, "issuer")
        if self.jwks_url:
            _check_url(self.jwks_url, "jwks_url")
        if not self.audiences or not all(self.audiences):
            raise ValueError("audiences: at least one non-empty audience is required")
        if self.claim_mappings.username.prefix is None:
            self.claim_mappings.username.prefix = f"{self.issuer}#"
        if self.claim_mappings.username.prefix.startswith("system:"):
            raise ValueError("claim_mappings.username.prefix must not start with system:")
        if self.claim_mappings.groups.prefix.startswith("system:"):
            raise ValueError("claim_mappings.groups.prefix must not start with system:")
        return self


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
        self._verifier = Verifier(self)
        return self

    @property
    def verifier(self) -> Verifier:
        return self._verifier


# ---------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------


class KeyFetchError(Exception):
    pass


def _max_age(cache_control: str | None) -> float:
    if cache_control and "no-store" not in cache_control.lower():
        match = MAX_AGE.search(cache_control)
        if match:
            return min(max(float(match.group(1)), MIN_KEYS_TTL), MAX_KEYS_TTL)
    return DEFAULT_KEYS_TTL


class IssuerKeys:
    """The JWKS of one issuer: cached with the server's max-age, refreshed single-flight and rate-limited."""

    def __init__(self, entry: IssuerSettings, session: Callable[[], aiohttp.ClientSession]):
        self.entry = entry
        self._session = session
        self.clock: Callable[[], float] = time.monotonic
        self.keys: KeySet | None = None
        self.kids: frozenset[str] = frozenset()
        self.expires_at = 0.0
        self.fetches = 0  # JWKS documents fetched (for tests and metrics)
        self.last_error = ""
        self._jwks_url = entry.jwks_url
        self._last_attempt: float | None = None
        self._inflight: asyncio.Future[None] | None = None

    async def get(self, kid: str | None) -> KeySet | None:
        """Keys to verify a token signed with `kid`; refreshes when stale or when `kid` is unknown."""
        if self.keys is None or self.clock() >= self.expires_at:
            await self.refresh()
        if kid is not None and kid not in self.kids:
            await self.refresh()
        return self.keys

    async def refresh(self) -> None:
        if self._inflight is not None:  # single flight: join the fetch under way
            await asyncio.shield(self._inflight)
            return
        now = self.clock()
        if self._last_attempt is not None and now - self._last_attempt < self.entry.jwks_min_refresh_seconds:
            return  # rate limit: a flood of unknown kids cannot hammer the IdP
        self._last_attempt = now
        future = asyncio.ensure_future(self._fetch())
        self._inflight = future
        try:
            await asyncio.shield(future)
        finally:
            self._inflight = None

    async def _fetch(self) -> None:
        try:
            url = self._jwks_url or await self._discover()
            document, cache_control = await self._get_json(url)
            keyset = _import_keys(document)
        except Exception as exc:
            self.last_error = str(exc) or type(exc).__name__
            log.warning("oidc: cannot fetch the keys of %s: %s", self.entry.issuer, self.last_error)
            if not self.entry.jwks_url:
                self._jwks_url = None  # rediscover next time
            return
        self.fetches += 1
        self.keys = keyset
        self.kids = frozenset(k.kid for k in keyset.keys if k.kid)
        self.expires_at = self.clock() + _max_age(cache_control)
        self.last_error = ""

    async def _discover(self) -> str:
        url = self.entry.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document, _ = await self._get_json(url)
        if document.get("issuer") != self.entry.issuer:
            raise KeyFetchError(f"discovery at {url} names issuer {document.get('issuer')!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeyFetchError(f"discovery at {url} has no jwks_uri")
        self._jwks_url = _check_url(jwks_uri, "jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[dict[str, Any], str | None]:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        async with self._session().get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise KeyFetchError(f"GET {url}: HTTP {resp.status}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise KeyFetchError(f"GET {url}: document too large")
            document = json.loads(body)
            if not isinstance(document, dict):
                raise KeyFetchError(f"GET {url}: not a JSON object")
            return document, resp.headers.get("Cache-Control")


def _import_keys(document: dict[str, Any]) -> KeySet:
    keys = []
    for item in document.get("keys") or []:
        if not isinstance(item, dict) or item.get("kty") == "oct":
            continue  # shared secrets are never signing keys here
        if item.get("use") not in (None, "sig"):
            continue
        try:
            keys.append(KeySet.import_key_set({"keys": [item]}).keys[0])
        except (JoseError, ValueError, TypeError, KeyError):
            log.info("oidc: skipping a JWKS key that cannot be imported (kid %r)", item.get("kid"))
    if not keys:
        raise KeyFetchError("the JWKS has no usable keys")
    return KeySet(keys)


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Header and payload of something shaped like a JWS compact JWT, unverified; None otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, payload = _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(payload, dict):
        return None
    return header, payload


class Verifier:
    """Verifies tokens for one connection's issuers; owns the key caches and the verified-token cache."""

    def __init__(self, settings: OIDCSettings):
        self.max_cached = settings.max_cached_tokens
        self.issuers = {entry.issuer: entry for entry in settings.issuers}
        self.keys = {entry.issuer: IssuerKeys(entry, self.session) for entry in settings.issuers}
        self.clock: Callable[[], float] = time.time
        self.verifications = 0  # full (non-cached) verifications, for tests and metrics
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()  # created lazily, inside the running loop
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def authenticate(self, token: str) -> Identity | AuthFailure | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self.clock():
                self._cache.move_to_end(key)
                return cached[1]
            del self._cache[key]
        answer = await self._verify(token)
        if isinstance(answer, AuthFailure):
            log.info("oidc: rejected token %s: %s", token_fingerprint(token), answer.reason)
        elif isinstance(answer, Identity) and self.max_cached:
            entry = self.issuers[answer.issuer]
            until = min(answer.expires_at or 0.0, self.clock() + entry.cache_ttl_seconds)
            if until > self.clock():
                self._cache[key] = (until, answer)
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        return answer

    async def _verify(self, token: str) -> Identity | AuthFailure | None:
        result = await self.verify_claims(token)
        if result is None or isinstance(result, AuthFailure):
            return result
        return map_identity(*result)

    async def verify_claims(self, token: str) -> tuple[IssuerSettings, dict[str, Any]] | AuthFailure | None:
        """Check signature and registered claims; None when the token is not a JWT of our issuers."""
        peeked = _peek(token)
        if peeked is None:
            return None
        header, payload = peeked
        entry = self.issuers.get(payload.get("iss"))  # type: ignore[arg-type]
        if entry is None:
            return None  # not an issuer of ours: another plugin may know it
        self.verifications += 1
        alg = header.get("alg")
        if alg not in entry.algorithms:
            return AuthFailure(f"algorithm {alg} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return AuthFailure("malformed token header (kid)")
        issuer_keys = self.keys[entry.issuer]
        keyset = await issuer_keys.get(kid)
        if keyset is None:
            return AuthFailure("cannot fetch the issuer's keys")
        if kid is not None and kid not in issuer_keys.kids:
            if issuer_keys.last_error:
                return AuthFailure("unknown signing key (cannot fetch the issuer's keys)")
            return AuthFailure("unknown signing key")
        try:
            claims = jwt.decode(token, keyset, algorithms=[alg]).claims
        except InvalidKeyIdError:
            return AuthFailure("unknown signing key")
        except BadSignatureError:
            return AuthFailure("signature verification failed")
        except (JoseError, ValueError, TypeError):
            return AuthFailure("malformed token")
        registry = JWTClaimsRegistry(
            now=int(self.clock()),
            leeway=entry.leeway_seconds,
            iss={"essential": True, "value": entry.issuer},
            aud={"essential": True, "values": entry.audiences},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            return AuthFailure("token expired")
        except MissingClaimError as exc:
            return AuthFailure(f"missing claim {exc.claim}")
        except InvalidClaimError as exc:
            if exc.claim == "aud":
                return AuthFailure(f"wrong audience (expected one of {', '.join(entry.audiences)})")
            if exc.claim in ("nbf", "iat"):
                return AuthFailure("token not valid yet")
            return AuthFailure(f"invalid claim {exc.claim}")
        except JoseError:
            return AuthFailure("invalid claims")
        if not isinstance(claims.get("exp"), int | float):
            return AuthFailure("invalid claim exp")
        return entry, claims


def _claim_strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def map_identity(entry: IssuerSettings, claims: dict[str, Any]) -> Identity | AuthFailure:
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
    if user.startswith("system:"):
        return AuthFailure(f"user name {user!r} is not allowed")
    groups: list[str] = []
    kept = {c: claims[c] for c in entry.keep_claims if c in claims}
    if entry.github_actions is not None:
        groups.append(GITHUB_ACTIONS_GROUP)
        for rule in entry.github_actions.rules:
            if rule.match.matches(claims):
                groups.extend(g for g in rule.groups if g not in groups)
    elif mappings.groups.claim in claims:
        raw = _claim_strings(claims[mappings.groups.claim])
        if raw is None:
            return AuthFailure(f"claim {mappings.groups.claim} must be a string or a list of strings")
        for group in raw:
            if group.startswith("system:"):
                return AuthFailure(f"group {group!r} is not allowed")
            mapped = mappings.groups.prefix + group
            if mapped.startswith("system:"):
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
        method=PLUGIN_NAME,
        issuer=entry.issuer,
        claims=kept,
        expires_at=float(claims["exp"]),
    )


# ---------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------


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
