"""The gateway's database: sqlmodel tables, SQLite by default (``STATE_DIR/kubegate.db``).

Plugins declare their tables as ``SQLModel`` classes with ``table=True`` (named ``kubegate_*``) and return
them from the ``kubegate_database_models`` hook. The built-in plugins' schema is versioned with alembic (``core/migrations``): ``kubegate db upgrade`` brings a
database to this kubegate's revision; at start an empty database is set up at once, and one whose schema
is behind stops the start with a message naming the command. Third-party plugins' tables are created when
missing, never altered. Calls are synchronous SQLAlchemy run in a worker thread (:meth:`Database.run`), so
the event loop never waits on the disk or the network.
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

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the first revision: the schema as it was before migrations
MIGRATION_LOCK = 0x6B75_6265  # PostgreSQL advisory lock id: one upgrader at a time across replicas


def import_models() -> list[type[SQLModel]]:
    """Declare every installed plugin's tables (`kubegate_database_models`) in SQLModel's metadata, before
    the schema is created, migrated or compared; returns the models."""
    from .plugins import PluginHost

    return PluginHost().database_models()


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


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
        """Make the schema ready at start: an empty database is brought to this kubegate's revision; one
        whose built-in schema is behind (or ahead) raises DatabaseError naming what to do. Then tables of
        other imported models (third-party plugins) are created when missing."""
        try:
            state = self.schema_state()
            if state == "empty":
                self.upgrade()
            elif state != "current":
                raise DatabaseError(state)
            SQLModel.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"cannot open the database: {exc.__class__.__name__}: {str(exc.args[0]).splitlines()[0]}"
            ) from None
        self._created = True

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def schema_state(self) -> str:
        """ "current", "empty", or a sentence saying why the schema does not fit this kubegate."""
        from sqlalchemy import inspect

        revision, head = self.revision(), head_revision()
        if revision == head:
            return "current"
        if revision is None:
            tables = [t for t in inspect(self.engine).get_table_names() if t.startswith("kubegate_")]
            if not tables:
                return "empty"
            return ("the database has kubegate tables but no schema revision (made before migrations): run "
                    "`kubegate db upgrade --config FILE` once")  # fmt: skip
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}
        if revision not in known:
            return (f"the database schema is at revision {revision}, which this kubegate does not know (a newer "
                    "kubegate wrote it): upgrade kubegate")  # fmt: skip
        return (f"the database schema is at revision {revision}, this kubegate needs {head}: back up the "
                "database, then run `kubegate db upgrade --config FILE`")  # fmt: skip

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the built-in schema to this kubegate's revision; returns (from, to). Replicas may call it at
        once: on PostgreSQL an advisory lock lets one upgrade while the others wait. A database made before
        migrations (tables, no revision) is marked as the first revision, then upgraded."""
        from alembic import command
        from sqlalchemy import inspect, text

        import_models()
        before = self.revision()
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            config = _alembic_config(connection)
            existing = [t for t in inspect(connection).get_table_names() if t.startswith("kubegate_")]
            from alembic.runtime.migration import MigrationContext

            if MigrationContext.configure(connection).get_current_revision() is None and existing:
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
        return before, head_revision()

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
