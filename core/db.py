"""The gateway's database: sqlmodel tables, SQLite by default (``STATE_DIR/kubegate.db``).

Plugins declare their tables as ``SQLModel`` classes with ``table=True`` (named ``kubegate_*``); the tables
of every imported plugin are created when the gateway starts. Calls are synchronous SQLAlchemy run in a
worker thread (:meth:`Database.run`), so the event loop never waits on the disk or the network. Schema
migrations come with PostgreSQL support for replicas; until then tables are only created, never altered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine

T = TypeVar("T")


class DatabaseError(Exception):
    """The database cannot be opened or used; the message says which and why."""


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'kubegate.db'}"


class Database:
    def __init__(self, url: str):
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise DatabaseError(f"not a database URL: {url!r}") from None
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        connect_args: dict[str, Any] = {}
        if self.is_sqlite:
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Used from worker threads; SQLite's own locking (busy timeout below) serialises writers.
            connect_args = {"check_same_thread": False, "timeout": 15}
        try:
            self.engine: Engine = create_engine(
                url, connect_args=connect_args, pool_pre_ping=not self.is_sqlite
            )
        except (ArgumentError, ImportError) as exc:
            raise DatabaseError(f"cannot use {parsed.render_as_string(hide_password=True)}: {exc}") from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._created = False

    def create_tables(self) -> None:
        """Create the tables of every imported model that does not exist yet."""
        try:
            SQLModel.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"cannot open the database: {exc.__class__.__name__}: {exc.args[0]}"
            ) from None
        self._created = True

    def session(self) -> Session:
        if not self._created:
            self.create_tables()
        return Session(self.engine, expire_on_commit=False)

    def call(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` and commit; the session is closed afterwards."""
        with self.session() as session:
            result = fn(session)
            session.commit()
            return result

    async def run(self, fn: Callable[[Session], T]) -> T:
        """:meth:`call` in a worker thread."""
        return await asyncio.to_thread(self.call, fn)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()


class Revocable(SQLModel):
    """Fields and state of a record that lives until it expires or is revoked (tokens, grants)."""

    created_at: float = 0.0
    expires_at: float = 0.0
    revoked_at: float | None = None
    revoked_by: str = ""

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"
