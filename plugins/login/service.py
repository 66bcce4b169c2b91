"""The login service: CLI logins, provider round trips, token minting, checking and revocation.

One instance per gateway (made at startup), shared by the routes and by every connection that accepts
gateway tokens. All state that must survive a restart or be seen by another replica is in the database;
the only memory state is a short-lived cache of token checks (`revocation_check_seconds`).
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

    async def close(self) -> None:
        for login in self.oidc.values():
            await login.close()

    # -- the CLI half ------------------------------------------------------------------------------------

    async def start_cli_login(
        self, code_challenge: str, connection: str | None, description: str
    ) -> store.LoginRequest:
        return await self.db.run(
            lambda s: store.new_login(
                s,
                verifier_hash=code_challenge,
                connection=connection,
                description=description,
                ttl=self.settings.login_timeout_seconds,
            )
        )

    async def collect(self, login_id: str, code_verifier: str) -> tuple[str, dict[str, Any]]:
        """Hand the CLI its token once the browser half is done. Raises LoginError (status, message)."""
        login = await self.db.run(lambda s: store.get_login(s, login_id))
        challenge = hashlib.sha256(code_verifier.encode()).hexdigest()
        if login is None or not hmac.compare_digest(login.verifier_hash, challenge):
            raise CollectError(404, "no such login")
        if login.status == store.FAILED:
            raise CollectError(403, login.error or "the login failed")
        if login.status == store.ISSUED:
            raise CollectError(410, "the token of this login was already collected")
        if login.expires_at < time.time():
            raise CollectError(410, "the login expired: run kubegate login again")
        if login.status == store.PENDING:
            raise CollectError(202, "waiting for the browser")
        return await self.db.run(lambda s: self._issue(s, login_id))

    def _issue(self, session: Session, login_id: str) -> tuple[str, dict[str, Any]]:
        # Only one collector may turn an authenticated login into a token, even across replicas.
        changed = session.execute(
            update(store.LoginRequest)
            .where(
                col(store.LoginRequest.id) == login_id, col(store.LoginRequest.status) == store.AUTHENTICATED
            )
            .values(status=store.ISSUED)
        )
        login = store.get_login(session, login_id)
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

    async def pending_login(self, login_id: str) -> store.LoginRequest:
        login = await self.db.run(lambda s: store.get_login(s, login_id))
        if login is None:
            raise LoginError("this login link is not known: start again with kubegate login")
        if login.expires_at < time.time():
            raise LoginError("this login link expired: start again with kubegate login")
        if login.status != store.PENDING:
            raise LoginError("this login was already completed")
        return login

    async def begin(self, login_id: str, provider: str) -> str:
        """Where to send the browser to log in at `provider`."""
        login = await self.pending_login(login_id)
        if provider in self.oidc:
            url, kept = await self.oidc[provider].authorization_url()
            login.state, login.nonce, login.pkce_verifier = (
                kept["state"],
                kept["nonce"],
                kept["pkce_verifier"],
            )
        elif provider in self.saml:
            url, request_id = self.saml[provider].authorization_url(login.id)
            login.saml_request_id = request_id
        else:
            raise LoginError(f"no login provider {provider!r}")
        login.provider = provider
        await self.db.run(lambda s: store.save(s, login))
        return url

    async def finish_oidc(self, state: str, code: str, error: str) -> dict[str, Any]:
        login = await self.db.run(lambda s: store.login_by_state(s, state)) if state else None
        if login is None and error:
            raise LoginError(f"the identity provider refused the login: {error}")
        if login is None or login.status != store.PENDING or login.provider not in self.oidc:
            raise LoginError("this login is not known or already completed: start again with kubegate login")
        if login.expires_at < time.time():
            raise LoginError("this login expired: start again with kubegate login")
        login.state = None  # the state is good for one callback only
        try:
            if error:
                raise LoginError(f"the identity provider refused the login: {error}")
            identity = await self.oidc[login.provider].finish(
                code, nonce=login.nonce, pkce_verifier=login.pkce_verifier
            )
        except LoginError as exc:
            await self._fail(login, str(exc))
            raise
        return await self._authenticated(login, identity_fields(identity, login.provider))

    async def finish_saml(self, provider: str, form: dict[str, str]) -> dict[str, Any]:
        saml = self.saml.get(provider)
        if saml is None:
            raise LoginError(f"no SAML provider {provider!r}")
        login = await self.pending_login(form.get("RelayState", ""))
        if login.provider != provider:
            raise LoginError("this login was not started at this identity provider")
        try:
            fields, assertion_id, guard_until = saml.finish(form, login.saml_request_id)
            fresh = await self.db.run(
                lambda s: store.remember_assertion(s, assertion_id, provider, guard_until)
            )
            if not fresh:
                raise LoginError("this SAML assertion was already used (replay refused)")
        except LoginError as exc:
            await self._fail(login, str(exc))
            raise
        fields["provider"] = provider
        return await self._authenticated(login, fields)

    async def abandon(self, login_id: str, reason: str) -> None:
        """Fail a login by id (its token can no longer be collected)."""
        login = await self.db.run(lambda s: store.get_login(s, login_id))
        if login is not None:
            await self._fail(login, reason)

    async def _fail(self, login: store.LoginRequest, reason: str) -> None:
        log.warning("login %s at %s failed: %s", login.id[:8], login.provider, reason)
        login.status, login.error = store.FAILED, reason
        await self.db.run(lambda s: store.save(s, login))

    async def _authenticated(self, login: store.LoginRequest, fields: dict[str, Any]) -> dict[str, Any]:
        login.status, login.identity, login.saml_request_id = store.AUTHENTICATED, fields, ""
        login.nonce = login.pkce_verifier = ""
        await self.db.run(lambda s: store.save(s, login))
        log.info("login %s: %s authenticated at %s", login.id[:8], fields["user"], login.provider)
        # Where the browser goes next: the web UI collects its own logins; the CLI's show a page.
        return {**fields, "login_id": login.id, "started_by": login.description}

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
