"""Browser login at an OpenID Connect provider: authorization code flow with PKCE and a nonce.

The ID token is checked by the same code as the `oidc` plugin's bearer tokens (core's issuer-token code:
JWKS cache, claims, mappings), so the identity a person gets is the same either way.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from kubegate.core.claims import check_url, map_identity
from kubegate.core.flow import AuthFailure, Identity
from kubegate.core.issuer_tokens import Verifier
from kubegate.core.jwks import FETCH_TIMEOUT_SECONDS

from .settings import OIDCLoginProvider

DISCOVERY_TTL_SECONDS = 3600.0


class LoginError(Exception):
    """The login cannot complete; the message is shown to the person in the browser."""


class OIDCLogin:
    def __init__(self, provider: OIDCLoginProvider, redirect_uri: str):
        self.provider = provider
        self.redirect_uri = redirect_uri
        # One issuer, no token cache: an ID token is used once, here.
        self.verifier = Verifier([provider], max_cached_tokens=0, method="oidc")
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0

    async def close(self) -> None:
        await self.verifier.close()

    async def _endpoints(self) -> dict[str, Any]:
        if self._discovery is None or time.monotonic() - self._discovered_at > DISCOVERY_TTL_SECONDS:
            url = self.provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
            try:
                async with self.verifier.session().get(url, timeout=timeout) as response:
                    if response.status != 200:
                        raise LoginError(
                            f"the identity provider's discovery document answered {response.status}"
                        )
                    document = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise LoginError(f"cannot reach the identity provider ({exc.__class__.__name__})") from None
            if not isinstance(document, dict) or document.get("issuer") != self.provider.issuer:
                raise LoginError("the identity provider's discovery document names another issuer")
            for key in ("authorization_endpoint", "token_endpoint"):
                try:
                    check_url(str(document.get(key, "")), key)
                except ValueError as exc:
                    raise LoginError(str(exc)) from None
            self._discovery, self._discovered_at = document, time.monotonic()
        return self._discovery

    async def authorization_url(self, state: str, *, nonce: str, pkce_verifier: str) -> str:
        """The URL to send the browser to; `nonce` and `pkce_verifier` must be known again at the callback."""
        endpoints = await self._endpoints()
        params = {
            **self.provider.authorize_params,
            "response_type": "code",
            "client_id": self.provider.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.provider.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": create_s256_code_challenge(pkce_verifier),
            "code_challenge_method": "S256",
        }
        endpoint = endpoints["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"

    async def finish(self, code: str, *, nonce: str, pkce_verifier: str) -> Identity:
        endpoints = await self._endpoints()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": pkce_verifier,
        }
        secret = self.provider.secret()
        auth = None
        if secret:
            auth = aiohttp.BasicAuth(self.provider.client_id, secret)  # client_secret_basic
        else:
            form["client_id"] = self.provider.client_id  # a public client
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        try:
            async with self.verifier.session().post(
                endpoints["token_endpoint"], data=form, auth=auth, timeout=timeout
            ) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LoginError(
                f"cannot redeem the code at the identity provider ({exc.__class__.__name__})"
            ) from None
        if not isinstance(body, dict):
            raise LoginError("the identity provider's token response is not JSON")
        if response.status != 200 or "id_token" not in body:
            error = body.get("error_description") or body.get("error") or f"status {response.status}"
            raise LoginError(f"the identity provider refused the code: {error}")
        result = await self.verifier.verify_claims(str(body["id_token"]))
        if result is None:
            raise LoginError("the ID token was not issued by this provider")
        if isinstance(result, AuthFailure):
            raise LoginError(f"the ID token was refused: {result.reason}")
        entry, claims = result
        if not nonce or claims.get("nonce") != nonce:
            raise LoginError("the ID token's nonce does not match this login (a replayed token?)")
        identity = map_identity(entry, claims, "oidc")
        if isinstance(identity, AuthFailure):
            raise LoginError(f"the ID token was refused: {identity.reason}")
        return identity
