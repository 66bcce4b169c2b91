"""Signed, self-contained login tickets: what a `kubegate login` is between its start and the moment the
person has authenticated at the identity provider.

Starting a login needs no credential, so nothing is stored for it: the login id the CLI gets is a ticket —
the CLI's code challenge, the short code, the description and the expiry, MACed with the gateway's login key
(HMAC-SHA256, the key shared by every replica through the database). The provider round trip is stateless
too: the OIDC `state` is a ticket of its own that carries the login's ticket, and the `nonce`, the PKCE
verifier and the SAML AuthnRequest ID are derived from it with the key. A row is written only once the
identity provider has answered (see ``store``), so a client that starts logins by the million fills
nothing and refuses no one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
MAC_BYTES = 16  # 128-bit tags: forging one is out of reach; the ticket stays short enough for a URL
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no words; no look-alike digits


class BadTicket(Exception):
    """Not a ticket this gateway signed (or not of this kind)."""


@dataclass(frozen=True)
class LoginTicket:
    id: str  # the ticket itself, as the CLI, the login URL and the web UI's cookie carry it
    key: str  # random; the database row of this login, once it has one, has this id
    code_challenge: str  # SHA-256 (hex) of the CLI's secret: only that CLI can collect the token
    user_code: str
    connection: str | None
    description: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadTicket from None


class TicketSigner:
    def __init__(self, key: bytes):
        self._key = key

    def _mac(self, kind: str, payload: bytes) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\0" + payload, hashlib.sha256).digest()[:MAC_BYTES]

    def _seal(self, kind: str, fields: dict[str, Any]) -> str:
        payload = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        return _b64(self._mac(kind, payload) + payload)

    def _open(self, kind: str, text: str) -> dict[str, Any]:
        # One spelling per ticket: base64's decoder would skip other characters, and the web UI compares
        # login ids as strings.
        if len(text) > 4096 or not BASE64URL.fullmatch(text):
            raise BadTicket
        raw = _unb64(text)
        tag, payload = raw[:MAC_BYTES], raw[MAC_BYTES:]
        if not hmac.compare_digest(tag, self._mac(kind, payload)):
            raise BadTicket
        fields = json.loads(payload)
        if not isinstance(fields, dict):
            raise BadTicket
        return fields

    def derive(self, purpose: str, text: str) -> str:
        """A secret bound to one ticket (an OIDC nonce, a PKCE verifier, a SAML request ID): never sent
        anywhere the ticket is not, and unknowable without the key."""
        return _b64(hmac.new(self._key, f"{purpose}\0{text}".encode(), hashlib.sha256).digest())

    # -- login tickets -----------------------------------------------------------------------------------

    def new_login(
        self, code_challenge: str, connection: str | None, description: str, ttl: float
    ) -> LoginTicket:
        code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
        fields = {
            "k": secrets.token_urlsafe(18),
            "c": code_challenge,
            "u": f"{code[:4]}-{code[4:]}",
            "n": connection,
            "d": description[:200],
            "e": round(time.time() + ttl, 3),
        }
        return self.open_login(self._seal("login", fields))

    def open_login(self, text: str) -> LoginTicket:
        """The login a ticket stands for; BadTicket when this gateway did not sign it. Expiry is the caller's
        to judge (an expired login is told apart from an unknown one)."""
        fields = self._open("login", text)
        try:
            return LoginTicket(
                id=text,
                key=str(fields["k"]),
                code_challenge=str(fields["c"]),
                user_code=str(fields["u"]),
                connection=None if fields["n"] is None else str(fields["n"]),
                description=str(fields["d"]),
                expires_at=float(fields["e"]),
            )
        except (KeyError, TypeError, ValueError):
            raise BadTicket from None

    # -- OIDC state --------------------------------------------------------------------------------------

    def oidc_state(self, login: LoginTicket, provider: str) -> str:
        # Random per round trip: each authorization request gets its own nonce and PKCE verifier.
        return self._seal("oidc-state", {"l": login.id, "p": provider, "r": secrets.token_urlsafe(12)})

    def open_oidc_state(self, state: str) -> tuple[LoginTicket, str]:
        fields = self._open("oidc-state", state)
        return self.open_login(str(fields.get("l", ""))), str(fields.get("p", ""))

    def saml_request_id(self, login: LoginTicket, provider: str) -> str:
        # An xsd:ID (starts with a letter or "_"): what `InResponseTo` of the response must name.
        return (
            "_" + hmac.new(self._key, f"saml\0{provider}\0{login.key}".encode(), hashlib.sha256).hexdigest()
        )
