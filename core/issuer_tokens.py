"""Verifying an issuer's signed tokens (JWTs: OIDC ID tokens, CI job tokens): a token is an issuer's when
it looks like a JWT and its (unverified) ``iss`` names a trusted issuer; it is then verified with that
issuer's keys (`jwks.py`) and its claims checked (``iss``, ``aud``, ``exp`` essential, ``nbf``/``iat``
with leeway), then mapped to an identity (`claims.py`). Verified tokens are cached by SHA-256 until they
expire (bounded LRU): a repeated token costs one hash and one dict lookup."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

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
from joserfc.jwt import JWTClaimsRegistry

from kubegate.core.claims import TokenIssuer, map_identity
from kubegate.core.flow import AuthFailure, Identity, token_fingerprint
from kubegate.core.jwks import IssuerKeys

log = logging.getLogger(__name__)


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

    def __init__(self, issuers: Sequence[TokenIssuer], max_cached_tokens: int, method: str):
        self.max_cached = max_cached_tokens
        self.method = method  # the identity's `method`: the plugin that accepted the token
        self.issuers = {entry.issuer: entry for entry in issuers}
        self.keys = {entry.issuer: IssuerKeys(entry, self.session) for entry in issuers}
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
        entry, claims = result
        return map_identity(entry, claims, self.method)

    async def verify_claims(self, token: str) -> tuple[TokenIssuer, dict[str, Any]] | AuthFailure | None:
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
