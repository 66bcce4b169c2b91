"""Approval requests and time-window grants in the database. Plain synchronous functions over a session;
callers run them through ``Database.run``. Changes to a request are compare-and-set on `version`, so two
reviewers (or two replicas) acting at once never lose an approval."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, Column, update
from sqlmodel import Field, Session, SQLModel, col, select

from kubegate.core.db import Revocable

PENDING, APPROVED, DENIED, EXPIRED, USED = "pending", "approved", "denied", "expired", "used"
OPEN_STATES = (PENDING, APPROVED)  # a retry of the same intent attaches to these
PREVIEW_CHARS = 1024  # of a body, in lists (one request's answer has it whole)


class ApprovalRecord(SQLModel, table=True):
    """One held intent: who asked to do exactly what, and what reviewers said."""

    __tablename__ = "kubegate_approvals"

    id: str = Field(primary_key=True)
    intent_hash: str = Field(index=True)
    connection: str = Field(index=True)
    rule: str = ""
    reason: str = ""  # the rule's message, shown to reviewers
    requester: str = Field(index=True)
    # The requester's person key (core/people.py): reviewers are refused and counted by person. Empty on
    # records made before person keys (their user name stands in).
    requester_person: str = ""
    requester_groups: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    requester_method: str = ""
    requester_claims: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    verb: str = ""
    resource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""  # path and query, exactly as sent
    body_sha256: str = ""
    # The body's media type as the API server reads it (the patch type of a PATCH), bound by the intent.
    # None on records held before it was bound: their intent matches no request now, and they cannot be
    # approved (service._check_approvable).
    media_type: str | None = Field(default="", nullable=True)
    body: str = ""  # the whole body, masked, as reviewers are shown it
    # The stored body is not the whole body: only on records from before whole bodies were kept (a
    # first-KiB preview); they cannot be approved.
    body_truncated: bool = False
    command: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    kubectl_command: str = ""
    # Why the requester says it asks (`Kubegate-Intent`, an MCP tool's `reason`), masked: shown to reviewers,
    # never part of the intent hash or the decision.
    intent: str = ""
    reviewer_groups: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    min_approvals: int = 1
    scope: str = "once"
    window_seconds: int = 0
    state: str = Field(default=PENDING, index=True)
    created_at: float = 0.0
    expires_at: float = 0.0
    decided_at: float | None = None
    used_at: float | None = None
    # Each approval: {"reviewer": user, "person": person key, "method", "comment", "at"}.
    approvals: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    denial: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    grant_id: str | None = None
    version: int = 0

    def public(self) -> dict[str, Any]:
        """The record as reviewers get it (`GET /api/approvals/ID`): with the whole body."""
        data = self.model_dump()
        data.pop("intent_hash")
        data.pop("version")
        return data

    def listed(self) -> dict[str, Any]:
        """The record in a list: its body's first `PREVIEW_CHARS` as `body_preview`, and `body_truncated`
        when that is not the whole body (the record itself has it)."""
        data = self.public()
        body = data.pop("body")
        data["body_preview"] = body[:PREVIEW_CHARS]
        data["body_truncated"] = self.body_truncated or len(body) > PREVIEW_CHARS
        return data


class GrantRecord(Revocable, table=True):
    """A time window in which an identity may do what one rule requires approval for, without asking."""

    __tablename__ = "kubegate_grants"

    id: str = Field(primary_key=True)
    approval_id: str = ""
    connection: str = Field(index=True)
    user: str = Field(index=True)
    rule: str = ""


def new_id() -> str:
    return secrets.token_hex(5)


def find_open(session: Session, intent_hash: str) -> ApprovalRecord | None:
    query = (
        select(ApprovalRecord)
        .where(ApprovalRecord.intent_hash == intent_hash, col(ApprovalRecord.state).in_(OPEN_STATES))
        .order_by(col(ApprovalRecord.created_at).desc())
    )
    now = time.time()
    for record in session.exec(query).all():
        if record.state == PENDING and record.expires_at > now:
            return record
        # An approval not yet used (its client left) stays usable as long as the request could wait.
        if (
            record.state == APPROVED
            and (record.decided_at or 0) + record.expires_at - record.created_at > now
        ):
            return record
    return None


def recently_refused(session: Session, intent_hash: str, within_seconds: float) -> ApprovalRecord | None:
    """The same intent denied or expired moments ago (a client's immediate retry gets that answer again)."""
    since = time.time() - within_seconds
    return session.exec(
        select(ApprovalRecord)
        .where(
            ApprovalRecord.intent_hash == intent_hash,
            col(ApprovalRecord.state).in_((DENIED, EXPIRED)),
            col(ApprovalRecord.decided_at) > since,
        )
        .order_by(col(ApprovalRecord.decided_at).desc())
    ).first()


def get(session: Session, approval_id: str) -> ApprovalRecord | None:
    return session.get(ApprovalRecord, approval_id)


def add(session: Session, record: SQLModel) -> None:
    session.add(record)


def change(session: Session, record: ApprovalRecord, **values: Any) -> bool:
    """Compare-and-set: apply `values` only if nobody changed the record since it was read."""
    result = session.execute(
        update(ApprovalRecord)
        .where(col(ApprovalRecord.id) == record.id, col(ApprovalRecord.version) == record.version)
        .values(version=record.version + 1, **values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_approvals(
    session: Session,
    *,
    states: list[str] | None = None,
    connections: list[str] | None = None,
    limit: int = 200,
) -> list[ApprovalRecord]:
    query = select(ApprovalRecord).order_by(col(ApprovalRecord.created_at).desc()).limit(limit)
    if states:
        query = query.where(col(ApprovalRecord.state).in_(states))
    if connections is not None:
        query = query.where(col(ApprovalRecord.connection).in_(connections))
    return list(session.exec(query).all())


def active_grant(session: Session, connection: str, user: str, rule: str) -> GrantRecord | None:
    now = time.time()
    return session.exec(
        select(GrantRecord).where(
            GrantRecord.connection == connection,
            GrantRecord.user == user,
            GrantRecord.rule == rule,
            col(GrantRecord.revoked_at).is_(None),
            GrantRecord.expires_at > now,
        )
    ).first()


def count_pending(session: Session) -> int:
    """Requests waiting for a reviewer now (for the gateway's metrics)."""
    from sqlalchemy import func

    query = (
        select(func.count())
        .select_from(ApprovalRecord)
        .where(ApprovalRecord.state == PENDING, col(ApprovalRecord.expires_at) > time.time())
    )
    return int(session.exec(query).one())


def list_grants(session: Session, *, include_inactive: bool = False) -> list[GrantRecord]:
    query = select(GrantRecord).order_by(col(GrantRecord.created_at))
    if not include_inactive:
        query = query.where(col(GrantRecord.revoked_at).is_(None), GrantRecord.expires_at > time.time())
    return list(session.exec(query).all())


def revoke_grant(session: Session, grant_id: str, by: str) -> GrantRecord | None:
    grant = session.get(GrantRecord, grant_id)
    if grant is None or grant.revoked_at is not None:
        return None
    grant.revoked_at, grant.revoked_by = time.time(), by
    session.add(grant)
    return grant
