"""The signing keys of a token issuer (its JWKS): discovered or configured, cached with the server's max-age,
refreshed once on an unknown ``kid`` (single-flight and rate-limited, so a flood of unknown kids cannot
hammer the issuer). Shared schemes only: a symmetric (``oct``) key is never a signing key here."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from kubegate.core.claims import TokenIssuer, check_url

log = logging.getLogger(__name__)

DEFAULT_KEYS_TTL = 300.0
MIN_KEYS_TTL = 60.0
MAX_KEYS_TTL = 86400.0
FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)


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

    def __init__(self, entry: TokenIssuer, session: Callable[[], aiohttp.ClientSession]):
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
        self._jwks_url = check_url(jwks_uri, "jwks_uri")
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
