"""Recorded sessions in the database: one row per exec/attach/port-forward session (inserted when it starts,
so a gateway that dies mid-session still leaves a row) and, with `storage: database`, the asciicast itself
as numbered chunks. Plain synchronous functions over a session; callers run them through ``Database.run``
(the gateway) or ``Database.call`` (the CLI)."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import JSON, Column, ColumnElement, Text, and_, false, or_
from sqlmodel import Field, Session, SQLModel, col, select

EXEC, ATTACH, PORTFORWARD = "exec", "attach", "portforward"


class SessionRecord(SQLModel, table=True):
    """Who ran what in which pod, when, for how long, how it ended, and where its recording is."""

    __tablename__ = "kubegate_sessions"

    id: str = Field(primary_key=True)
    request_id: str = Field(default="", index=True)  # the flow id, also in the audit events
    connection: str = Field(default="", index=True)
    user: str = Field(default="", index=True)
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    kind: str = EXEC  # exec | attach | portforward
    namespace: str = ""
    pod: str = ""
    container: str = ""
    command: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    ports: str = ""  # port-forward: the ports asked for
    tty: bool = False
    subprotocol: str = ""
    started: float = Field(default=0.0, index=True)
    ended: float | None = None
    exit_code: int | None = None
    exit_reason: str = ""
    bytes_in: int = 0  # client → cluster, as relayed
    bytes_out: int = 0  # cluster → client, as relayed (after masking)
    storage: str = ""  # directory | database | "" (nothing recorded: port-forward)
    location: str = ""  # directory: the file's absolute path
    width: int | None = None
    height: int | None = None
    events: int = 0
    cast_bytes: int = 0
    incomplete: bool = False  # a write failed or events were dropped: the recording has gaps
    kubectl_session: str = ""

    def public(self) -> dict[str, Any]:
        """What the API and `sessions list -o json` show (not the storage path)."""
        data = self.model_dump()
        data.pop("location")
        data["duration"] = round(self.ended - self.started, 3) if self.ended is not None else None
        data["recorded"] = bool(self.storage)
        return data


class SessionChunk(SQLModel, table=True):
    """A piece of a recording kept in the database, in write order."""

    __tablename__ = "kubegate_session_chunks"

    session_id: str = Field(primary_key=True)
    seq: int = Field(primary_key=True)
    data: str = Field(default="", sa_column=Column(Text))


def new_id() -> str:
    return "s-" + secrets.token_hex(6)


def add(session: Session, record: SQLModel) -> None:
    session.add(record)


def get(session: Session, session_id: str) -> SessionRecord | None:
    return session.get(SessionRecord, session_id)


def update(session: Session, session_id: str, **values: Any) -> None:
    record = session.get(SessionRecord, session_id)
    if record is not None:
        for key, value in values.items():
            setattr(record, key, value)
        session.add(record)


def list_sessions(
    session: Session,
    *,
    user: str | None = None,
    since: float | None = None,
    connections: list[str] | None = None,
    readable: dict[str, str | None] | None = None,
    limit: int = 200,
) -> list[SessionRecord]:
    """Newest first. `readable`, what a reader may see by connection: None, every session there; a user name,
    only theirs; connections not in it, nothing (in the query, so that `limit` counts only those)."""
    query = select(SessionRecord).order_by(col(SessionRecord.started).desc()).limit(limit)
    if user:
        query = query.where(SessionRecord.user == user)
    if since is not None:
        query = query.where(col(SessionRecord.started) >= since)
    if connections is not None:
        query = query.where(col(SessionRecord.connection).in_(connections))
    if readable is not None:
        everything = [name for name, owner in readable.items() if owner is None]
        conditions: list[ColumnElement[bool]] = (
            [col(SessionRecord.connection).in_(everything)] if everything else []
        )
        conditions += [
            and_(col(SessionRecord.connection) == name, col(SessionRecord.user) == owner)
            for name, owner in readable.items()
            if owner
        ]
        query = query.where(or_(*conditions) if conditions else false())
    return list(session.exec(query).all())


def append_chunk(session: Session, session_id: str, seq: int, data: str) -> None:
    session.add(SessionChunk(session_id=session_id, seq=seq, data=data))


def read_chunks(session: Session, session_id: str) -> str:
    chunks = session.exec(
        select(SessionChunk).where(SessionChunk.session_id == session_id).order_by(col(SessionChunk.seq))
    ).all()
    return "".join(chunk.data for chunk in chunks)
