"""Audit records in the database: one chained row per event, with searchable columns; search, the command
view and chain verification. Plain synchronous functions over a session (run them through `Database.run`).

Rows are written in batches under a lock on the chain head (`SELECT … FOR UPDATE` on PostgreSQL); the
position `seq` is the primary key, so two writers that ever read the same head (SQLite, or a lost lock)
collide on insert and the later one retries — the chain never forks.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Index, Text, and_, false, insert, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Column, Field, Session, SQLModel, col, select

from . import chain
from .chain import GENESIS

if TYPE_CHECKING:
    from kubegate.core.db import Database

CHAIN = "audit"


class AuditRow(SQLModel, table=True):
    __tablename__ = "kubegate_audit_events"
    # "what did this person do lately" (search by user and time, replay --user --since)
    __table_args__ = (Index("ix_kubegate_audit_events_user_time", "user", "time"),)

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    event_id: str = Field(index=True)
    time: float = Field(index=True)
    kind: str = Field(index=True)
    connection: str = Field(index=True)
    request_id: str = Field(index=True)
    user: str = Field(default="", index=True)
    groups: str = ""  # JSON list, searched as text
    auth_method: str = ""
    verb: str = Field(default="", index=True)
    resource: str = ""
    namespace: str = ""
    name: str = ""
    decision: str = Field(default="", index=True)  # allow, deny, unauthenticated, or "" (no decision plugin)
    status: int = 0
    kubectl_command: str = ""
    kubectl_session: str = Field(default="", index=True)
    record: str = Field(sa_column=Column(Text, nullable=False))  # the canonical record the hash covers
    prev_hash: str = ""
    hash: str = ""
    signature: str = ""


class AuditHead(SQLModel, table=True):
    """The last record written: where the next one links, and what `verify` compares the tail with."""

    __tablename__ = "kubegate_audit_head"

    name: str = Field(primary_key=True)
    seq: int = 0
    hash: str = GENESIS


COLUMNS = ("time", "kind", "connection", "request_id", "user", "groups", "auth_method", "verb", "resource",
           "namespace", "name", "decision", "status", "kubectl_command", "kubectl_session")  # fmt: skip


ROW_FIELDS = ("seq", "event_id", "record", "prev_hash", "hash", "signature", *COLUMNS)
_QUOTED_FIELDS = ", ".join(f'"{name}"' for name in ROW_FIELDS)
_SQLITE_INSERT = (
    f"INSERT INTO {AuditRow.__tablename__} ({_QUOTED_FIELDS}) VALUES ({', '.join('?' * len(ROW_FIELDS))})"
)


def columns_of(record: dict[str, Any]) -> dict[str, Any]:
    """The searchable columns of a record, derived from its content (verify recomputes them)."""
    data = record.get("data") or {}
    identity = data.get("identity") or {}
    attributes = data.get("attributes") or {}
    decision = data.get("decision") or {}
    verdict = str(decision.get("verdict", "")) if decision else ""
    if data.get("auth_failure"):
        verdict = "unauthenticated"
    columns = {
        "time": record.get("time"),
        "kind": record.get("kind"),
        "connection": record.get("connection"),
        "request_id": record.get("request_id"),
        "user": identity.get("user", "") or data.get("user", "") or data.get("requester", "") or "",
        "groups": json.dumps(identity.get("groups") or []),
        "auth_method": identity.get("method", "") or "",
        "verb": attributes.get("verb", "") or data.get("verb", "") or "",
        "resource": attributes.get("resource", "") or data.get("resource", "") or "",
        "namespace": attributes.get("namespace", "") or data.get("namespace", "") or "",
        "name": attributes.get("name", "") or data.get("name", "") or "",
        "decision": verdict,
        "status": int(data.get("status") or 0),
        "kubectl_command": data.get("kubectl_command", "") or "",
        "kubectl_session": data.get("kubectl_session", "") or "",
    }
    for name, value in columns.items():
        # PostgreSQL text cannot hold NUL, and a user name can (an IdP-signed token's subject `\u0000`, whose
        # refusal is audited); no database takes a lone surrogate (`\ud800`). One such row would fail its
        # batch on every retry and stop the records behind it. The record keeps NUL (JSON writes it as an
        # escape; chain.canonical replaces lone surrogates); its search column gets U+FFFD.
        if isinstance(value, str) and _UNSTORABLE.search(value):
            columns[name] = _UNSTORABLE.sub("\ufffd", value)
    return columns


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def append(session: Session, records: list[dict[str, Any]], signer: chain.Signer | None) -> int:
    """Chain and insert `records` (in order) after the current head; returns the last seq."""
    head = session.exec(select(AuditHead).where(AuditHead.name == CHAIN).with_for_update()).first()
    if head is None:
        head = AuditHead(name=CHAIN, seq=0, hash=GENESIS)
        session.add(head)
    seq, prev = head.seq, head.hash
    rows = []
    for record in records:
        seq += 1
        content = {**record, "seq": seq}
        text = chain.canonical(content)
        digest = chain.link(prev, text)
        signature = signer.sign(digest) if signer is not None and signer.can_sign else ""
        rows.append({"seq": seq, "event_id": record["id"], "record": text, "prev_hash": prev, "hash": digest,
                     "signature": signature, **columns_of(content)})  # fmt: skip
        prev = digest
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        # sqlite3's own executemany, in the session's transaction: SQLAlchemy's parameter processing per row
        # was an eighth of the writer's CPU. (PostgreSQL keeps Core, whose insertmanyvalues sends one
        # multi-row INSERT where the driver's executemany would send a statement per row.)
        driver = connection.connection.driver_connection
        assert driver is not None
        driver.executemany(_SQLITE_INSERT, [tuple(row[name] for name in ROW_FIELDS) for row in rows])
    else:
        # One executemany rather than an ORM object per event (a third of the CPU), through Core on the
        # session's connection rather than the ORM's bulk insert (which sorts rows into commands first).
        connection.execute(insert(AuditRow.__table__), rows)  # type: ignore[attr-defined]
    head.seq, head.hash = seq, prev
    session.add(head)
    return seq


def write(database: Database, records: list[dict[str, Any]], signer: chain.Signer | None, *,
          retry: bool = False) -> None:  # fmt: skip
    """Append `records` in one transaction. `retry`: this batch (or a prefix of it) failed before, and a
    failure can hide a commit (the connection or the writer process lost after COMMIT), so records already
    stored, found by their unique event id, are not written twice."""
    for attempt in range(8):
        try:
            with database.session() as session:
                pending = unwritten(session, records) if retry else records
                if pending:
                    append(session, pending, signer)
                session.commit()
            return
        except (IntegrityError, sqlite3.IntegrityError):
            # Another writer (a replica, another worker's writer) took the same positions first: re-read the
            # head and go again. (On SQLite the insert is the driver's own, whose errors SQLAlchemy does not
            # wrap.)
            if attempt == 7:
                raise


def unwritten(session: Session, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` without those already stored (by event id)."""
    ids = [record["id"] for record in records]
    stored_ids: set[str] = set()
    for start in range(0, len(ids), 500):  # bound the IN list
        chunk = ids[start : start + 500]
        stored_ids.update(
            session.exec(select(AuditRow.event_id).where(col(AuditRow.event_id).in_(chunk))).all()
        )
    return [record for record in records if record["id"] not in stored_ids]


# -- search ------------------------------------------------------------------------------------------------


@dataclass
class Filters:
    user: str | None = None
    group: str | None = None
    connection: str | None = None
    verb: str | None = None
    resource: str | None = None
    namespace: str | None = None
    decision: str | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    command: str | None = None  # a substring of the kubectl command line
    session: str | None = None  # a Kubectl-Session id
    seq: int | None = None  # one record
    # What the reader may see, by connection: None, every event there; a user name, only that user's events.
    # Connections not in it: nothing. Left None (no narrowing) only by who reads the database itself (the CLI).
    readable: dict[str, str | None] | None = None


def _readable(readable: dict[str, str | None]) -> Any:
    """The condition that keeps a row within `readable` (in the query, so `limit` counts only rows the reader
    may see)."""
    everything = [name for name, user in readable.items() if user is None]
    conditions: list[ColumnElement[bool]] = [col(AuditRow.connection).in_(everything)] if everything else []
    conditions += [
        and_(col(AuditRow.connection) == name, col(AuditRow.user) == user)
        for name, user in readable.items()
        if user
    ]
    return or_(*conditions) if conditions else false()


def _query(filters: Filters) -> Any:
    query = select(AuditRow)
    if filters.readable is not None:
        query = query.where(_readable(filters.readable))
    for column in ("user", "connection", "verb", "resource", "namespace", "decision", "kind"):
        value = getattr(filters, column)
        if value:
            query = query.where(getattr(AuditRow, column) == value)
    if filters.group:
        query = query.where(col(AuditRow.groups).contains(json.dumps(filters.group)))
    if filters.since is not None:
        query = query.where(AuditRow.time >= filters.since)
    if filters.until is not None:
        query = query.where(AuditRow.time <= filters.until)
    if filters.command:
        query = query.where(col(AuditRow.kubectl_command).contains(filters.command))
    if filters.session:
        query = query.where(AuditRow.kubectl_session == filters.session)
    if filters.seq is not None:
        query = query.where(AuditRow.seq == filters.seq)
    return query


def search(session: Session, filters: Filters, limit: int = 1000) -> list[dict[str, Any]]:
    """Matching records, oldest first (the last `limit` of them)."""
    rows = session.exec(_query(filters).order_by(col(AuditRow.seq).desc()).limit(limit)).all()
    return [json.loads(row.record) for row in reversed(rows)]


def export(session: Session, filters: Filters, batch: int = 1000) -> Iterator[str]:
    """Matching records as canonical JSON lines with their chain fields, oldest first, in batches."""
    last = 0
    while True:
        rows = session.exec(
            _query(filters).where(AuditRow.seq > last).order_by(col(AuditRow.seq)).limit(batch)
        ).all()
        if not rows:
            return
        for row in rows:
            content = json.loads(row.record)
            yield chain.canonical({"record": content, "prev_hash": row.prev_hash, "hash": row.hash,
                                   "signature": row.signature})  # fmt: skip
        last = rows[-1].seq


# A call without a Kubectl-Session this soon before a kubectl invocation of the same user is part of it:
# kubectl's dispatcher asks /version before the real kubectl runs (and sends no session header).
PREAMBLE_SECONDS = 5.0


# The records that are a client's call: requests, and exec/attach/port-forward sessions (their start).
CALL_KINDS = ("request", "session_start")


def commands(session: Session, filters: Filters, limit: int = 200) -> list[dict[str, Any]]:
    """API calls grouped by kubectl invocation (`Kubectl-Session`; calls without one stand alone, except a
    non-resource call right before an invocation of the same user, which joins it), newest invocation last:
    who ran which command when, how many calls, how many refused or failed, who approved held ones."""
    rows = session.exec(
        _query(filters)
        .where(col(AuditRow.kind).in_(CALL_KINDS))
        .order_by(col(AuditRow.seq).desc())
        .limit(limit * 20)
    ).all()
    groups: dict[str, dict[str, Any]] = {}
    for row in reversed(rows):
        data = json.loads(row.record).get("data") or {}
        key = row.kubectl_session or f"request:{row.request_id}"
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "session": row.kubectl_session,
                "user": row.user,
                "connection": row.connection,
                "command": row.kubectl_command,
                "started": row.time,
                "ended": row.time,
                "calls": 0,
                "denied": 0,
                "failed": 0,
                "approved_by": [],
                "requests": [],
            }
        group["ended"] = max(group["ended"], row.time)
        group["calls"] += 1
        if row.decision in ("deny", "unauthenticated") or row.status in (401, 403):
            group["denied"] += 1
        elif (row.status >= 400 or row.status == 0) and not _waited_for_deletion(group["requests"], row):
            group["failed"] += 1
        approval = data.get("approval")
        if isinstance(approval, dict):
            for approver in approval.get("approvers") or []:
                if approver not in group["approved_by"]:
                    group["approved_by"].append(approver)
        path = (data.get("path") or "").split("?", 1)[0]
        group["requests"].append(
            {"seq": row.seq, "time": row.time, "verb": row.verb, "resource": row.resource, "path": path,
             "namespace": row.namespace, "name": row.name, "status": row.status, "decision": row.decision}
        )  # fmt: skip
    return _join_preambles(list(groups.values()))[-limit:]


def _waited_for_deletion(earlier: list[dict[str, Any]], row: AuditRow) -> bool:
    """A 404 GET of an object the same invocation deleted: `kubectl delete` waiting for it to be gone (its
    success), not a failure."""
    return row.status == 404 and row.verb == "get" and any(
        r["verb"] == "delete" and 200 <= r["status"] < 300 and (r["resource"], r["namespace"], r["name"])
        == (row.resource, row.namespace, row.name) for r in earlier
    )  # fmt: skip


def _join_preambles(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold each lone non-resource call (no session, no resource: /version, /api…) into the kubectl
    invocation of the same user and connection that starts within PREAMBLE_SECONDS after it."""
    joined: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        lone = not group["session"] and group["calls"] == 1 and not group["requests"][0]["resource"]
        if lone:
            same = (group["user"], group["connection"])
            following = next(
                (g for g in groups[index + 1 :] if g["session"] and (g["user"], g["connection"]) == same),
                None,
            )
            if following is not None and 0 <= following["started"] - group["ended"] <= PREAMBLE_SECONDS:
                following["requests"][:0] = group["requests"]
                following["calls"] += 1
                following["failed"] += group["failed"]
                following["denied"] += group["denied"]
                following["started"] = min(following["started"], group["started"])
                continue
        joined.append(group)
    return joined


def head(session: Session) -> tuple[int, str]:
    found = session.get(AuditHead, CHAIN)
    return (found.seq, found.hash) if found is not None else (0, GENESIS)


def stored(session: Session, batch: int = 2000) -> Iterator[chain.Stored]:
    """Every row in seq order, as the chain check reads it."""
    last = -1
    while True:
        rows = session.exec(
            select(AuditRow).where(AuditRow.seq > last).order_by(col(AuditRow.seq)).limit(batch)
        ).all()
        if not rows:
            return
        for row in rows:
            yield chain.Stored(
                seq=row.seq,
                text=row.record,
                prev_hash=row.prev_hash,
                hash=row.hash,
                signature=row.signature,
                columns={name: getattr(row, name) for name in COLUMNS},
            )
        last = rows[-1].seq


def verify(session: Session, signer: chain.Signer | None = None) -> tuple[int, chain.Problem | None]:
    return chain.verify(stored(session), signer, head=head(session), derive=columns_of)
