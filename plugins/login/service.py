"""The login service: CLI logins, provider round trips, token minting, checking and revocation.

One instance per gateway (made at startup), shared by the routes and by every connection that accepts
gateway tokens. All state that must survive a restart or be seen by another replica is in the database;
the only memory state is a short-lived cache of token checks (`revocation_check_seconds`). A login is a
signed ticket (``tickets``) until the identity provider answers: starting one stores nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col

from kubegate.core.db import Database
from kubegate.core.flow import AuthFailure, Identity, token_fingerprint
from kubegate.core.people import EXCHANGED_FROM_CLAIM

from . import store
from .oidc_flow import LoginError, OIDCLogin
from .saml_flow import SAMLLogin
from .settings import LoginConnectionSettings, LoginSettings, OIDCLoginProvider
from .tickets import BadTicket, LoginTicket, TicketSigner

log = logging.getLogger("kubegate.login")

MAX_CACHED_CHECKS = 100_000


def identity_fields(identity: Identity, provider: str) -> dict[str, Any]:
    fields = asdict(identity)
    fields["extra"] = {k: list(v) for k, v in identity.extra.items()}
    fields["groups"] = list(identity.groups)
    fields["provider"] = provider
    fields.pop("expires_at", None)
    return fields


class LoginService:
    def __init__(self, database: Database, settings: LoginSettings | None, public_url: str):
        self.db = database
        self.settings = settings or LoginSettings.model_construct(providers=[])
        self.public_url = public_url.rstrip("/")
        self.oidc: dict[str, OIDCLogin] = {}
        self.saml: dict[str, SAMLLogin] = {}
        for provider in self.settings.providers:
            if isinstance(provider, OIDCLoginProvider):
                self.oidc[provider.name] = OIDCLogin(provider, f"{self.public_url}/login/oidc/callback")
            else:
                self.saml[provider.name] = SAMLLogin(provider, self.public_url)
        self._checks: dict[str, tuple[float, store.TokenRecord | None]] = {}
        self._lookups: dict[str, asyncio.Future[store.TokenRecord | None]] = {}
        self._tickets: TicketSigner | None = None

    async def close(self) -> None:
        for login in self.oidc.values():
            await login.close()

    # -- the CLI half ------------------------------------------------------------------------------------

    async def tickets(self) -> TicketSigner:
        if self._tickets is None:
            self._tickets = TicketSigner(await self.db.run(store.login_key))
        return self._tickets

    async def start_cli_login(
        self, code_challenge: str, connection: str | None, description: str
    ) -> LoginTicket:
        """A new login: a signed ticket, nothing stored (starting one needs no credential)."""
        signer = await self.tickets()
        return signer.new_login(code_challenge, connection, description, self.settings.login_timeout_seconds)

    async def _ticket(self, login_id: str) -> LoginTicket | None:
        try:
            return (await self.tickets()).open_login(login_id)
        except BadTicket:
            return None

    async def collect(self, login_id: str, code_verifier: str) -> tuple[str, dict[str, Any]]:
        """Hand the CLI its token once the browser half is done. Raises CollectError (status, message)."""
        ticket = await self._ticket(login_id)
        challenge = hashlib.sha256(code_verifier.encode()).hexdigest()
        if ticket is None or not hmac.compare_digest(ticket.code_challenge, challenge):
            raise CollectError(404, "no such login")
        login = await self.db.run(lambda s: store.get_login(s, ticket.key))
        if login is not None and login.status in (store.FAILED, store.REFUSED):
            raise CollectError(403, login.error or "the login failed")
        if login is not None and login.status == store.ISSUED:
            raise CollectError(410, "the token of this login was already collected")
        if ticket.expires_at < time.time():
            raise CollectError(410, "the login expired: run kubegate login again")
        if login is None:
            raise CollectError(202, "waiting for the browser")
        return await self.db.run(lambda s: self._issue(s, ticket.key))

    def _issue(self, session: Session, key: str) -> tuple[str, dict[str, Any]]:
        # Only one collector may turn an authenticated login into a token, even across replicas.
        changed = session.execute(
            update(store.LoginRequest)
            .where(col(store.LoginRequest.id) == key, col(store.LoginRequest.status) == store.AUTHENTICATED)
            .values(status=store.ISSUED)
        )
        login = store.get_login(session, key)
        if changed.rowcount != 1 or login is None or login.identity is None:  # type: ignore[attr-defined]
            raise CollectError(410, "the token of this login was already collected")
        token, record = store.mint_token(
            session,
            login.identity,
            ttl_seconds=self.settings.token_ttl_seconds,
            connection=None,
            description=login.description,
        )
        login.identity = None  # nothing about the person stays on the login row
        session.add(login)
        log.info("login: issued token %s to %s via %s", record.id, record.user, record.provider)
        return token, token_summary(record)

    # -- the browser half --------------------------------------------------------------------------------

    async def pending_login(self, login_id: str) -> LoginTicket:
        ticket = await self._ticket(login_id)
        if ticket is None:
            raise LoginError("this login link is not known: start again with kubegate login")
        if ticket.expires_at < time.time():
            raise LoginError("this login link expired: start again with kubegate login")
        if await self.db.run(lambda s: store.get_login(s, ticket.key)) is not None:
            raise LoginError("this login was already completed")
        return ticket

    async def begin(self, login_id: str, provider: str) -> str:
        """Where to send the browser to log in at `provider`. Stores nothing: what the answer is checked
        against (`state`, `nonce`, PKCE verifier, SAML request ID) comes back in it or is derived from it."""
        ticket = await self.pending_login(login_id)
        signer = await self.tickets()
        if provider in self.oidc:
            state = signer.oidc_state(ticket, provider)
            return await self.oidc[provider].authorization_url(
                state, nonce=signer.derive("oidc-nonce", state), pkce_verifier=signer.derive("pkce", state)
            )
        if provider in self.saml:
            return self.saml[provider].authorization_url(ticket.id, signer.saml_request_id(ticket, provider))
        raise LoginError(f"no login provider {provider!r}")

    async def finish_oidc(self, state: str, code: str, error: str) -> dict[str, Any]:
        signer = await self.tickets()
        try:
            ticket, provider = signer.open_oidc_state(state) if state else (None, "")
        except BadTicket:
            ticket, provider = None, ""
        if ticket is None and error:
            raise LoginError(f"the identity provider refused the login: {error}")
        if ticket is None or provider not in self.oidc:
            raise LoginError("this login is not known or already completed: start again with kubegate login")
        if ticket.expires_at < time.time():
            raise LoginError("this login expired: start again with kubegate login")
        if await self.db.run(lambda s: store.get_login(s, ticket.key)) is not None:
            raise LoginError("this login is not known or already completed: start again with kubegate login")
        try:
            if error:
                raise LoginError(f"the identity provider refused the login: {error}")
            identity = await self.oidc[provider].finish(
                code, nonce=signer.derive("oidc-nonce", state), pkce_verifier=signer.derive("pkce", state)
            )
        except LoginError as exc:
            await self._refuse(ticket, provider, str(exc))
            raise
        return await self._authenticated(ticket, provider, identity_fields(identity, provider))

    async def finish_saml(self, provider: str, form: dict[str, str]) -> dict[str, Any]:
        saml = self.saml.get(provider)
        if saml is None:
            raise LoginError(f"no SAML provider {provider!r}")
        ticket = await self.pending_login(form.get("RelayState", ""))
        request_id = (await self.tickets()).saml_request_id(ticket, provider)
        try:
            # A response must answer the AuthnRequest this login sent to this provider (`InResponseTo`).
            fields, assertion_id, guard_until = saml.finish(form, request_id)
            fresh = await self.db.run(
                lambda s: store.remember_assertion(s, assertion_id, provider, guard_until)
            )
            if not fresh:
                raise LoginError("this SAML assertion was already used (replay refused)")
        except LoginError as exc:
            await self._refuse(ticket, provider, str(exc))
            raise
        fields["provider"] = provider
        return await self._authenticated(ticket, provider, fields)

    async def abandon(self, login_id: str, reason: str) -> None:
        """Fail an authenticated login by id (its token can no longer be collected)."""
        ticket = await self._ticket(login_id)
        if ticket is None:
            return
        key = ticket.key

        def fail(session: Session) -> None:
            login = store.get_login(session, key)
            if login is not None and login.status == store.AUTHENTICATED:
                login.status, login.error, login.identity = store.FAILED, reason, None
                session.add(login)

        log.warning("login %s failed: %s", key[:8], reason)
        await self.db.run(fail)

    def _row(self, ticket: LoginTicket, provider: str, status: str) -> store.LoginRequest:
        return store.LoginRequest(
            id=ticket.key,
            verifier_hash=ticket.code_challenge,
            user_code=ticket.user_code,
            connection=ticket.connection,
            description=ticket.description,
            created_at=time.time(),
            expires_at=ticket.expires_at,
            status=status,
            provider=provider,
        )

    async def _refuse(self, ticket: LoginTicket, provider: str, reason: str) -> None:
        log.warning("login %s at %s failed: %s", ticket.key[:8], provider, reason)
        row = self._row(ticket, provider, store.REFUSED)
        row.error = reason
        await self.db.run(lambda s: store.record_login(s, row))

    async def _authenticated(
        self, ticket: LoginTicket, provider: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        row = self._row(ticket, provider, store.AUTHENTICATED)
        row.identity = fields
        if not await self.db.run(lambda s: store.record_login(s, row)):
            # Another callback for this login got there first (a replay, or a second tab).
            raise LoginError("this login was already completed")
        log.info("login %s: %s authenticated at %s", ticket.key[:8], fields["user"], provider)
        # Where the browser goes next: the web UI collects its own logins; the CLI's show a page.
        return {**fields, "login_id": ticket.id, "started_by": ticket.description}

    # -- exchange, checks, revocation --------------------------------------------------------------------

    async def exchange(
        self, identity: Identity, connection: str, description: str
    ) -> tuple[str, dict[str, Any]]:
        fields = identity_fields(identity, connection)
        # The original method, for people (core.people.matched_method) and audit.
        fields["claims"] = {**fields["claims"], EXCHANGED_FROM_CLAIM: identity.method}
        fields["method"] = "exchange"
        token, record = await self.db.run(
            lambda s: store.mint_token(
                s,
                fields,
                ttl_seconds=self.settings.exchange_token_ttl_seconds,
                connection=connection,
                description=description,
            )
        )
        log.info("login: exchanged a %s token of %s for token %s", identity.method, record.user, record.id)
        return token, token_summary(record)

    async def check(
        self, token: str, connection: str, rules: LoginConnectionSettings | None
    ) -> Identity | AuthFailure:
        if not store.TOKEN_SHAPE.match(token):
            return AuthFailure("malformed gateway token")
        digest = store.token_hash(token)
        cached = self._checks.get(digest)
        if cached is not None and time.monotonic() - cached[0] < self.settings.revocation_check_seconds:
            record = cached[1]
        else:
            # One database lookup per token at a time: concurrent requests with it share the answer.
            pending = self._lookups.get(digest)
            if pending is None:
                pending = asyncio.ensure_future(self._lookup(digest))
                self._lookups[digest] = pending
                pending.add_done_callback(lambda _: self._lookups.pop(digest, None))
            record = await asyncio.shield(pending)
        answer = _judge(record, connection, rules)
        if isinstance(answer, AuthFailure):
            log.info("login: rejected token %s: %s", token_fingerprint(token), answer.reason)
        return answer

    async def _lookup(self, digest: str) -> store.TokenRecord | None:
        record = await self.db.run(lambda s: store.find_token(s, digest))
        if len(self._checks) >= MAX_CACHED_CHECKS:
            self._checks.clear()
        self._checks[digest] = (time.monotonic(), record)
        return record

    async def revoke_presented(self, token: str) -> list[store.TokenRecord]:
        digest = store.token_hash(token)
        self._checks.pop(digest, None)
        return await self.db.run(
            lambda s: store.revoke_tokens(s, digest=digest, by="owner (kubegate logout)")
        )


class CollectError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def token_summary(record: store.TokenRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "user": record.user,
        "groups": record.groups,
        "method": record.method,
        "provider": record.provider,
        "connection": record.connection,
        "expires_at": record.expires_at,
    }


def _judge(
    record: store.TokenRecord | None, connection: str, rules: LoginConnectionSettings | None
) -> Identity | AuthFailure:
    if record is None:
        return AuthFailure("unknown gateway token: run kubegate login")
    if record.revoked_at is not None:
        return AuthFailure("gateway token revoked: run kubegate login")
    if record.expires_at <= time.time():
        return AuthFailure("gateway token expired: run kubegate login")
    if record.connection is not None and record.connection != connection:
        return AuthFailure(f"this gateway token is for connection {record.connection}")
    if rules is not None:
        if record.method == "exchange":
            if not rules.allow_exchanged:
                return AuthFailure("exchanged tokens are not accepted on this connection")
        elif rules.providers is not None and record.provider not in rules.providers:
            return AuthFailure(f"tokens from login provider {record.provider} are not accepted here")
    return Identity(
        user=record.user,
        groups=tuple(record.groups),
        uid=record.uid,
        extra={k: tuple(v) for k, v in record.extra.items()},
        method=f"login:{record.method}",
        issuer=record.issuer,
        claims={**record.claims, "token_id": record.id, "provider": record.provider},
        expires_at=record.expires_at,
    )
