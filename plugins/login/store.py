"""What the login plugin keeps in the database: gateway tokens (hashed), pending logins, seen SAML
assertion IDs. Plain synchronous functions over a session; callers run them through ``Database.run``."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

from sqlalchemy import JSON, Column
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, func, select

from kubegate.core.db import Revocable

TOKEN_PREFIX = "kgt_"
TOKEN_SHAPE = re.compile(r"^kgt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
AUTHENTICATED, ISSUED, FAILED = "authenticated", "issued", "failed"
# A login the identity provider (or the gateway, on its answer) refused before anyone authenticated. Anyone
# can make one (start a login, send the callback an error), so they are capped, oldest dropped first: a
# dropped one only leaves its CLI waiting until the login expires. FAILED rows (a login that authenticated
# and was then abandoned) are never dropped.
REFUSED = "refused"
MAX_REFUSED_LOGINS = 10_000
LOGIN_KEY_ID = "login-tickets"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRecord(Revocable, table=True):
    """A gateway-issued token. Only its SHA-256 is stored; the token itself is shown once, to its owner."""

    __tablename__ = "kubegate_tokens"

    id: str = Field(primary_key=True)  # public, e.g. for `kubegate tokens revoke ID`
    token_hash: str = Field(index=True, unique=True)
    user: str = Field(index=True)
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    uid: str = ""
    extra: dict[str, list[str]] = Field(default_factory=dict, sa_column=Column(JSON))
    issuer: str = ""
    claims: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    method: str = ""  # how the owner proved who they are: oidc, saml or exchange
    provider: str = ""  # the login provider (or the connection, for an exchange)
    connection: str | None = None  # None: every connection that enables `login`
    description: str = ""


class LoginRequest(SQLModel, table=True):
    """A `kubegate login` the identity provider has answered (a login waiting for its browser half is a
    signed ticket, not a row: see ``tickets``). Its id is the ticket's key; it expires with the ticket."""

    __tablename__ = "kubegate_login_requests"

    id: str = Field(primary_key=True)
    verifier_hash: str  # SHA-256 of the CLI's secret: only that CLI can collect the token
    user_code: str
    connection: str | None = None
    description: str = ""
    created_at: float = 0.0
    expires_at: float = 0.0
    status: str = AUTHENTICATED
    provider: str = ""
    # Unused since the round trip is stateless (tickets); kept so the schema needs no migration.
    state: str | None = Field(default=None, index=True)
    nonce: str = ""
    pkce_verifier: str = ""
    saml_request_id: str = ""
    identity: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str = ""


class LoginKey(SQLModel, table=True):
    """The HMAC key login tickets are signed with: made by the first gateway that needs it, shared by every
    replica through the database (a ticket started on one is good on all)."""

    __tablename__ = "kubegate_login_keys"

    id: str = Field(primary_key=True)
    key: str  # hex, 256 bits
    created_at: float = 0.0


class SeenAssertion(SQLModel, table=True):
    """SAML assertion IDs already used, kept until the assertion would have expired anyway."""

    __tablename__ = "kubegate_saml_assertions"

    id: str = Field(primary_key=True)
    provider: str = ""
    expires_at: float = 0.0


# -- tokens ------------------------------------------------------------------------------------------------


def mint_token(
    session: Session,
    identity: dict[str, Any],
    *,
    ttl_seconds: float,
    connection: str | None,
    description: str,
    now: float | None = None,
) -> tuple[str, TokenRecord]:
    now = time.time() if now is None else now
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    expires_at = now + ttl_seconds
    record = TokenRecord(
        id=token_id,
        token_hash=token_hash(token),
        user=identity["user"],
        groups=list(identity.get("groups", [])),
        uid=identity.get("uid", ""),
        extra={k: list(v) for k, v in identity.get("extra", {}).items()},
        issuer=identity.get("issuer", ""),
        claims=identity.get("claims", {}),
        method=identity.get("method", ""),
        provider=identity.get("provider", ""),
        connection=connection,
        description=description[:200],
        created_at=now,
        expires_at=expires_at,
    )
    session.add(record)
    return token, record


def find_token(session: Session, digest: str) -> TokenRecord | None:
    return session.exec(select(TokenRecord).where(TokenRecord.token_hash == digest)).first()


def list_tokens(
    session: Session, *, user: str | None = None, include_inactive: bool = False, now: float | None = None
) -> list[TokenRecord]:
    now = time.time() if now is None else now
    query = select(TokenRecord).order_by(col(TokenRecord.created_at))
    if user:
        query = query.where(TokenRecord.user == user)
    if not include_inactive:
        query = query.where(col(TokenRecord.revoked_at).is_(None), TokenRecord.expires_at > now)
    return list(session.exec(query).all())


def revoke_tokens(
    session: Session,
    *,
    token_id: str | None = None,
    user: str | None = None,
    digest: str | None = None,
    by: str,
    now: float | None = None,
) -> list[TokenRecord]:
    """Revoke one token (by id or hash) or all of a user's; returns the records revoked now."""
    now = time.time() if now is None else now
    query = select(TokenRecord).where(col(TokenRecord.revoked_at).is_(None))
    if token_id is not None:
        query = query.where(TokenRecord.id == token_id)
    elif digest is not None:
        query = query.where(TokenRecord.token_hash == digest)
    elif user is not None:
        query = query.where(TokenRecord.user == user)
    else:
        raise ValueError("say which tokens to revoke")
    revoked = list(session.exec(query).all())
    for record in revoked:
        record.revoked_at = now
        record.revoked_by = by
        session.add(record)
    return revoked


# -- logins ------------------------------------------------------------------------------------------------


def login_key(session: Session) -> bytes:
    """The ticket key, made now when there is none; a replica that made it a moment ago wins."""
    row = session.get(LoginKey, LOGIN_KEY_ID)
    if row is None:
        session.add(LoginKey(id=LOGIN_KEY_ID, key=secrets.token_hex(32), created_at=time.time()))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
        row = session.get(LoginKey, LOGIN_KEY_ID)
        assert row is not None
    return bytes.fromhex(row.key)


def _drop_expired(session: Session, now: float) -> None:
    # Old rows are dropped as new ones come: the table stays small without a janitor.
    for old in session.exec(select(LoginRequest).where(LoginRequest.expires_at < now - 3600)).all():
        session.delete(old)


def record_login(session: Session, login: LoginRequest) -> bool:
    """Store a login the identity provider has answered; False when this login already has a row (it was
    completed or refused before: each login ends once, also across replicas)."""
    now = time.time()
    _drop_expired(session, now)
    if login.status == REFUSED:
        refused = select(LoginRequest).where(LoginRequest.status == REFUSED)
        count = session.exec(select(func.count()).select_from(refused.subquery())).one()
        if count >= MAX_REFUSED_LOGINS:
            oldest = refused.order_by(col(LoginRequest.created_at)).limit(count - MAX_REFUSED_LOGINS + 1)
            for old in session.exec(oldest).all():
                session.delete(old)
    if session.get(LoginRequest, login.id) is not None:
        return False
    session.add(login)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        return False
    return True


def get_login(session: Session, login_id: str) -> LoginRequest | None:
    return session.get(LoginRequest, login_id)


def save(session: Session, record: SQLModel) -> None:
    session.add(record)


def remember_assertion(session: Session, assertion_id: str, provider: str, expires_at: float) -> bool:
    """Record a SAML assertion ID; False when it was seen before (a replay)."""
    now = time.time()
    for old in session.exec(select(SeenAssertion).where(SeenAssertion.expires_at < now - 600)).all():
        session.delete(old)
    if session.get(SeenAssertion, assertion_id) is not None:
        return False
    session.add(SeenAssertion(id=assertion_id, provider=provider, expires_at=expires_at))
    try:
        session.flush()  # a replica that recorded it a moment ago makes this fail: still a replay
    except IntegrityError:
        session.rollback()
        return False
    return True
