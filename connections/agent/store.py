"""What the agent tunnel keeps in the database: single-use join tokens (hashed), enrolled agents and their
public keys, one row per open tunnel (agent x gateway replica) with its heartbeat, and the gateway's SSH host
key (so every replica presents the same one). Plain synchronous functions over a session; callers run them
through ``Database.run``."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import JSON, Column, delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

JOIN_TOKEN_PREFIX = "kgj_"
JOIN_TOKEN_SHAPE = re.compile(r"^kgj_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
# A DNS-1123 subdomain label set: the name is also the agent's SSH user name and shows in logs and metrics.
AGENT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
PUBLIC_KEY_SHAPE = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [^\r\n]*)?$")
HOST_KEY_ID = "ssh"
UNUSABLE_TOKEN = "the join token is unknown, expired or already used"
# Tunnel rows of an agent that ended (or whose replica vanished) longer ago than this are dropped as new
# tunnels of that agent open: the table stays small without a janitor.
SESSION_RETENTION_SECONDS = 7 * 86400


class JoinTokenRecord(SQLModel, table=True):
    """A single-use enrolment token. Only its SHA-256 is stored; the token is shown once, to the operator."""

    __tablename__ = "kubegate_agent_join_tokens"

    id: str = Field(primary_key=True)  # the 12 hex characters after the prefix: public, for logs
    token_hash: str = Field(index=True, unique=True)
    connections: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    agent_name: str = ""  # preset by the operator; empty: the agent chooses its name
    created_at: float = 0.0
    expires_at: float = 0.0
    created_by: str = ""
    used_at: float | None = None
    used_by: str = ""  # the agent enrolled with it


class AgentRecord(SQLModel, table=True):
    """An enrolled agent: the key it logs in with and the connections it may serve."""

    __tablename__ = "kubegate_agents"

    name: str = Field(primary_key=True)
    public_key: str  # one OpenSSH line, "ssh-ed25519 AAAA..."
    fingerprint: str  # "SHA256:..."
    connections: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    enrolled_at: float = 0.0
    token_id: str = ""
    revoked_at: float | None = None
    revoked_by: str = ""


class AgentSessionRecord(SQLModel, table=True):
    """One tunnel: an agent connected to one gateway replica. `last_seen` is the replica's heartbeat."""

    __tablename__ = "kubegate_agent_sessions"

    id: str = Field(primary_key=True)
    agent: str = Field(index=True)
    replica: str = ""
    peer: str = ""  # the agent's address as the replica saw it
    version: str = ""  # the agent's kubegate version
    connections: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    connected_at: float = 0.0
    last_seen: float = 0.0
    disconnected_at: float | None = None


class HostKeyRecord(SQLModel, table=True):
    """The gateway's SSH host key when no `host_key_file` is configured: made once, shared by replicas."""

    __tablename__ = "kubegate_agent_host_keys"

    id: str = Field(primary_key=True)  # always "ssh"
    private_key: str  # OpenSSH PEM
    created_at: float = 0.0


class EnrolmentError(Exception):
    """An enrolment refused; ``str(exc)`` is a one-line reason for the agent, with no secret in it."""


def join_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def valid_agent_name(name: str) -> bool:
    return bool(AGENT_NAME.match(name))


# -- join tokens and enrolment -----------------------------------------------------------------------------


def mint_join_token(
    session: Session,
    connections: list[str],
    *,
    ttl_seconds: float,
    agent_name: str = "",
    created_by: str = "",
    now: float | None = None,
) -> tuple[str, JoinTokenRecord]:
    """A new join token for `connections` (returned once, with its record; only the hash is stored).
    `agent_name`, when given, is the only name an agent may enrol under with it. ValueError for no
    connections, a bad name or a non-positive ttl."""
    if not connections:
        raise ValueError("a join token needs at least one connection")
    if agent_name and not valid_agent_name(agent_name):
        raise ValueError(f"agent name {agent_name!r} must be lower-case letters, digits, '-' and '.'")
    if ttl_seconds <= 0:
        raise ValueError("the ttl must be positive")
    now = time.time() if now is None else now
    token_id = secrets.token_hex(6)
    token = f"{JOIN_TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    record = JoinTokenRecord(
        id=token_id,
        token_hash=join_token_hash(token),
        connections=list(dict.fromkeys(connections)),
        agent_name=agent_name,
        created_at=now,
        expires_at=now + ttl_seconds,
        created_by=created_by,
    )
    session.add(record)
    session.flush()
    return token, record


def redeem_join_token(
    session: Session,
    token: str,
    *,
    agent_name: str,
    public_key: str,
    fingerprint: str,
    now: float | None = None,
) -> AgentRecord:
    """Spend `token` to enrol `agent_name` with `public_key`; returns the agent's record (committed by the
    caller's ``Database.call``). Single use across replicas: the token is marked used by a conditional UPDATE
    whose row count decides, and a name is claimed by an INSERT (primary key) or, for a revoked name, a
    conditional UPDATE — two enrolments racing for one token or one name cannot both win.

    A token is spent only by a successful enrolment: every refusal (EnrolmentError) leaves the database as it
    was, so an operator can retry a refused name or key with the same token. Refusals: a malformed, unknown,
    expired or used token (one message for all, not saying which); a name other than the token's preset one
    (an empty `agent_name` takes the preset); a name that is not a DNS-style label; a name enrolled and not
    revoked; a public key that is not one ``ssh-ed25519`` line. A revoked name may enrol again: its row
    gets the new key, connections and token, and is no longer revoked."""
    now = time.time() if now is None else now
    record = None
    if JOIN_TOKEN_SHAPE.match(token):
        record = session.exec(
            select(JoinTokenRecord).where(JoinTokenRecord.token_hash == join_token_hash(token))
        ).first()
    if record is None or record.used_at is not None or record.expires_at <= now:
        raise EnrolmentError(UNUSABLE_TOKEN)
    name = agent_name or record.agent_name
    if record.agent_name and name != record.agent_name:
        raise EnrolmentError(f"this join token is for agent {record.agent_name!r}, not {name!r}")
    if not valid_agent_name(name):
        raise EnrolmentError(
            f"agent name {name[:80]!r} must be lower-case letters, digits, '-' and '.' (at most 63), "
            "starting and ending with a letter or digit"
        )
    if not PUBLIC_KEY_SHAPE.match(public_key.strip()):
        raise EnrolmentError("the public key must be one OpenSSH 'ssh-ed25519 ...' line")
    already = f"agent {name} is already enrolled; revoke it first or choose another name"
    existing = session.get(AgentRecord, name)
    if existing is not None and existing.revoked_at is None:
        raise EnrolmentError(already)

    spent = session.execute(
        update(JoinTokenRecord)
        .where(
            col(JoinTokenRecord.id) == record.id,
            col(JoinTokenRecord.used_at).is_(None),
            col(JoinTokenRecord.expires_at) > now,
        )
        .values(used_at=now, used_by=name)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]  # another replica redeemed it first
        session.rollback()
        raise EnrolmentError(UNUSABLE_TOKEN)
    values: dict[str, Any] = {
        "public_key": public_key.strip(),
        "fingerprint": fingerprint,
        "connections": list(record.connections),
        "enrolled_at": now,
        "token_id": record.id,
        "revoked_at": None,
        "revoked_by": "",
    }
    if existing is None:
        session.add(AgentRecord(name=name, **values))
        try:
            session.flush()
        except IntegrityError:  # the same name enrolled at the same moment with another token
            session.rollback()
            raise EnrolmentError(already) from None
    else:
        replaced = session.execute(
            update(AgentRecord)
            .where(col(AgentRecord.name) == name, col(AgentRecord.revoked_at).is_not(None))
            .values(**values)
        )
        if replaced.rowcount != 1:  # type: ignore[attr-defined]  # re-enrolled by another token meanwhile
            session.rollback()
            raise EnrolmentError(already)
        session.expire(existing)
    agent = session.get(AgentRecord, name)
    assert agent is not None
    return agent


# -- agents ------------------------------------------------------------------------------------------------


def find_agent(session: Session, name: str) -> AgentRecord | None:
    """The agent named `name`, revoked or not (check ``revoked_at``)."""
    return session.get(AgentRecord, name)


def revoke_agent(session: Session, name: str, *, by: str = "", now: float | None = None) -> bool:
    """End the identity of agent `name`: its key no longer logs in, and each replica closes the agent's
    tunnels at its next heartbeat. False when there is no such agent or it was already revoked."""
    now = time.time() if now is None else now
    revoked = session.execute(
        update(AgentRecord)
        .where(col(AgentRecord.name) == name, col(AgentRecord.revoked_at).is_(None))
        .values(revoked_at=now, revoked_by=by)
    )
    return revoked.rowcount == 1  # type: ignore[attr-defined]


def list_agents(
    session: Session, *, include_revoked: bool = False, stale_after: float = 60.0, now: float | None = None
) -> list[dict[str, Any]]:
    """One dict per agent, by name: name, fingerprint, connections, enrolled_at, revoked_at, revoked_by,
    "tunnels" (open sessions heard from within `stale_after` seconds: replica, peer, version, connections,
    connected_at, last_seen), and "last_seen" / "version" of its most recent session of any state (None /
    "" when it never connected)."""
    now = time.time() if now is None else now
    query = select(AgentRecord).order_by(col(AgentRecord.name))
    if not include_revoked:
        query = query.where(col(AgentRecord.revoked_at).is_(None))
    agents = list(session.exec(query).all())
    sessions: dict[str, list[AgentSessionRecord]] = {}
    if agents:
        rows = session.exec(
            select(AgentSessionRecord)
            .where(col(AgentSessionRecord.agent).in_([a.name for a in agents]))
            .order_by(col(AgentSessionRecord.connected_at))
        ).all()
        for row in rows:
            sessions.setdefault(row.agent, []).append(row)
    listed = []
    for agent in agents:
        rows = sessions.get(agent.name, [])
        latest = max(rows, key=lambda r: r.last_seen, default=None)
        listed.append(
            {
                "name": agent.name,
                "fingerprint": agent.fingerprint,
                "connections": list(agent.connections),
                "enrolled_at": agent.enrolled_at,
                "revoked_at": agent.revoked_at,
                "revoked_by": agent.revoked_by,
                "last_seen": latest.last_seen if latest else None,
                "version": latest.version if latest else "",
                "tunnels": [
                    {
                        "replica": r.replica,
                        "peer": r.peer,
                        "version": r.version,
                        "connections": list(r.connections),
                        "connected_at": r.connected_at,
                        "last_seen": r.last_seen,
                    }
                    for r in rows
                    if r.disconnected_at is None and r.last_seen >= now - stale_after
                ],
            }
        )
    return listed


# -- tunnels -----------------------------------------------------------------------------------------------


def open_session(
    session: Session,
    *,
    agent: str,
    replica: str,
    peer: str,
    version: str,
    connections: list[str],
    now: float | None = None,
) -> str:
    """Record a tunnel of `agent` to this `replica`; returns its id (for touch_sessions / close_session).
    Rows of this agent's tunnels that ended more than a week ago are dropped meanwhile."""
    now = time.time() if now is None else now
    cutoff = now - SESSION_RETENTION_SECONDS
    session.execute(
        delete(AgentSessionRecord).where(
            col(AgentSessionRecord.agent) == agent,
            (col(AgentSessionRecord.disconnected_at) < cutoff) | (col(AgentSessionRecord.last_seen) < cutoff),
        )
    )
    session_id = uuid.uuid4().hex
    session.add(
        AgentSessionRecord(
            id=session_id,
            agent=agent,
            replica=replica,
            peer=peer,
            version=version,
            connections=list(connections),
            connected_at=now,
            last_seen=now,
        )
    )
    session.flush()
    return session_id


def touch_sessions(session: Session, ids: list[str], now: float | None = None) -> None:
    """The heartbeat: `last_seen` = now for these open tunnels (one statement for all of a replica's)."""
    if not ids:
        return
    now = time.time() if now is None else now
    session.execute(
        update(AgentSessionRecord)
        .where(col(AgentSessionRecord.id).in_(ids), col(AgentSessionRecord.disconnected_at).is_(None))
        .values(last_seen=now)
    )


def close_session(session: Session, session_id: str, now: float | None = None) -> None:
    """Mark a tunnel ended (once; a second call keeps the first time)."""
    now = time.time() if now is None else now
    session.execute(
        update(AgentSessionRecord)
        .where(col(AgentSessionRecord.id) == session_id, col(AgentSessionRecord.disconnected_at).is_(None))
        .values(disconnected_at=now, last_seen=now)
    )


# -- the gateway's host key --------------------------------------------------------------------------------


def load_or_create_host_key(session: Session, generate: Callable[[], str]) -> str:
    """The shared SSH host key (OpenSSH PEM). The first replica to need it stores `generate()`; a replica
    that loses that race (IntegrityError on the primary key) rolls its session back and reads the winner's.
    Call it in a session of its own (it may roll the session back)."""
    stored = session.get(HostKeyRecord, HOST_KEY_ID)
    if stored is not None:
        return stored.private_key
    private_key = generate()
    session.add(HostKeyRecord(id=HOST_KEY_ID, private_key=private_key, created_at=time.time()))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        stored = session.get(HostKeyRecord, HOST_KEY_ID)
        if stored is None:  # pragma: no cover - the winner's row is committed before our insert fails
            raise
        return stored.private_key
    return private_key


def join_token_usable(session: Session, token: str, now: float | None = None) -> bool:
    """Whether `token` could be redeemed now (checked at SSH login; redeeming it stays atomic)."""
    if not JOIN_TOKEN_SHAPE.match(token):
        return False
    now = time.time() if now is None else now
    record = session.exec(
        select(JoinTokenRecord).where(JoinTokenRecord.token_hash == join_token_hash(token))
    ).first()
    return record is not None and record.used_at is None and record.expires_at > now
