"""The `audit-db` plugin: audit events into the database (SQLite by default, PostgreSQL for replicas), hash-
chained and optionally signed; searched with `kubegate audit …` and the JSON API (`routes.py`).

Enable it per connection (`connections.NAME.plugins.audit-db: {}`); its settings are gateway-wide
(`plugins.audit-db`), since all connections share one chain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import Field
from quart import Blueprint
from sqlalchemy.exc import IntegrityError, OperationalError

from kubegate.core.db import Database, DatabaseError
from kubegate.core.plugins import hookimpl

from . import chain, store
from .sink import SigningSettings, SinkPlugin, SinkSettings, SinkWriter

if TYPE_CHECKING:
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
        description="Groups that may read everyone's events through the API; others see their own.",
    )


class DatabaseSink(SinkWriter):
    name = "audit-db"

    def __init__(self, settings: AuditDbSettings, database: Database, signer: chain.Signer | None,
                 owns_database: bool = False):  # fmt: skip
        super().__init__(settings)
        self.database, self.signer, self.owns_database = database, signer, owns_database

    async def close(self, drain_seconds: float = 10.0) -> None:
        await super().close(drain_seconds)
        if self.owns_database:
            self.database.close()

    def write(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(8):
            try:
                with self.database.session() as session:
                    store.append(session, batch, self.signer)
                    session.commit()
                return
            except IntegrityError:
                # Another writer (a replica) took the same positions first: re-read the head and go again.
                if attempt == 7:
                    raise


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
    return DatabaseSink(settings, database, signer, owns_database=database is not gateway.database)


class DatabaseSinkPlugin(SinkPlugin):
    """A sink plugin with the audit JSON API (routes.py)."""

    @hookimpl
    def kubegate_http_routes(self, gateway: Gateway) -> Blueprint | None:
        from .routes import make_blueprint

        return make_blueprint(gateway, PLUGIN_NAME)


PLUGIN = DatabaseSinkPlugin(PLUGIN_NAME, __name__, AuditDbSettings, make_sink)
