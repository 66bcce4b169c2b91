"""The `audit-db` plugin: audit events into the database (SQLite by default, PostgreSQL for replicas), hash-
chained and optionally signed; searched with `kubegate audit …` and the JSON API (`routes.py`).

Enable it per connection (`connections.NAME.plugins.audit-db: {}`); its settings are gateway-wide
(`plugins.audit-db`), since all connections share one chain.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from pydantic import Field
from quart import Blueprint
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from kubegate.core.db import Database, DatabaseError
from kubegate.core.plugins import hookimpl

from . import chain, store
from .sink import SigningSettings, SinkPlugin, SinkSettings, SinkWriter
from .writer import WriterGone, WriterProcess

if TYPE_CHECKING:
    from sqlmodel import SQLModel

    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-db"
log = logging.getLogger("kubegate.audit")


class AuditDbSettings(SinkSettings, SigningSettings):
    url: str | None = Field(
        None,
        description="A database of its own for audit (SQLAlchemy URL); default the gateway's `database`.",
    )
    readers: list[str] = Field(
        default_factory=lambda: ["kubegate:auditors"],
        description="Groups that may read everyone's events through the API (on the connections where "
        "the caller is in one of them); others see their own.",
    )


class DatabaseSink(SinkWriter):
    """Batches go to a writer process of their own (writer.py) when another process can open the database
    (a file or a server); an in-memory SQLite database is written from a thread of this process."""

    name = "audit-db"

    def __init__(self, settings: AuditDbSettings, database: Database, signer: chain.Signer | None,
                 owns_database: bool = False, process: WriterProcess | None = None):  # fmt: skip
        super().__init__(settings)
        self.database, self.signer, self.owns_database = database, signer, owns_database
        self.process = process

    def start(self) -> None:
        if self.process is not None:
            try:
                self.process.start()
            except WriterGone as exc:
                # Not fatal: every write tries to start it again, failing (and, fail-closed, gating) meanwhile.
                log.error("audit sink %s: %s", self.name, exc)
        super().start()

    async def close(self, drain_seconds: float = 10.0) -> None:
        await super().close(drain_seconds)
        if self.process is not None:
            await asyncio.to_thread(self.process.close)
        if self.owns_database:
            self.database.close()

    def write(self, batch: list[dict[str, Any]]) -> None:
        if self.process is not None:
            self.process.write(batch, self.retrying)
        else:
            store.write(self.database, batch, self.signer, retry=self.retrying)


def settings_of(gateway: Gateway) -> AuditDbSettings:
    found = gateway.settings_for(PLUGIN_NAME)
    return found if isinstance(found, AuditDbSettings) else AuditDbSettings()


def database_of(gateway: Gateway, settings: AuditDbSettings) -> Database:
    if not settings.url:
        return gateway.database
    database = Database(settings.url)
    database.create_tables()  # the same migrations as the gateway's database (a behind schema stops the start)
    return database


def make_sink(gateway: Gateway, settings: AuditDbSettings | None) -> DatabaseSink:
    settings = settings or AuditDbSettings()
    try:
        signer = settings.signer(gateway.config_path.parent)
        database = database_of(gateway, settings)
    except (DatabaseError, OperationalError) as exc:
        raise ValueError(str(exc)) from None
    if signer is not None and not signer.can_sign:
        raise ValueError("the signing key can only verify (an Ed25519 public key)")
    process = None
    # KUBEGATE_AUDIT_WRITER=thread keeps the writer in a thread of this process, as before issue 15 (for a
    # platform that forbids starting processes, and for side-by-side measurements: bench/audit.py).
    if shareable(database.url) and os.environ.get("KUBEGATE_AUDIT_WRITER", "process") != "thread":
        signing = (signer.algorithm, signer.key) if signer is not None else None
        process = WriterProcess(database.url, signing)
    return DatabaseSink(
        settings, database, signer, owns_database=database is not gateway.database, process=process
    )


def shareable(url: str) -> bool:
    """Whether another process can open the same database (not an in-memory SQLite one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return True
    return parsed.database not in (None, "", ":memory:") and "mode=memory" not in str(parsed.query)


class DatabaseSinkPlugin(SinkPlugin):
    """A sink plugin with the audit JSON API (routes.py)."""

    @hookimpl
    def kubegate_database_models(self) -> list[type[SQLModel]]:
        return [store.AuditRow, store.AuditHead]

    @hookimpl
    def kubegate_http_routes(self, gateway: Gateway) -> Blueprint | None:
        from .routes import make_blueprint

        return make_blueprint(gateway, PLUGIN_NAME)


PLUGIN = DatabaseSinkPlugin(PLUGIN_NAME, __name__, AuditDbSettings, make_sink)
