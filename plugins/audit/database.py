"""The `audit-db` plugin: audit events into the database (SQLite by default, PostgreSQL for replicas), hash-
chained and optionally signed; searched with `kubegate audit …` and the JSON API (`routes.py`).

Enable it per connection (`connections.NAME.plugins.audit-db: {}`); its settings are gateway-wide
(`plugins.audit-db`), since all connections share one chain.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field
from quart import Blueprint
from sqlalchemy.exc import IntegrityError, OperationalError

from kubegate.core.db import Database, DatabaseError
from kubegate.core.flow import AuditEvent, Decision, Flow
from kubegate.core.plugins import hookimpl

from . import chain, store
from .sink import SinkSettings, SinkWriter

if TYPE_CHECKING:
    from pydantic import BaseModel

    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-db"
log = logging.getLogger("kubegate.audit")


class AuditDbSettings(SinkSettings):
    url: str | None = Field(
        None,
        description="A database of its own for audit (SQLAlchemy URL); default the gateway's `database`.",
    )
    signing_algorithm: Literal["hmac-sha256", "ed25519"] | None = Field(
        None, description="Sign every chain hash with a key kept outside the database."
    )
    signing_key_file: Path | None = Field(
        None, description="The key: a secret of ≥16 bytes (HMAC) or an Ed25519 PEM private key."
    )
    readers: list[str] = Field(
        default_factory=lambda: ["kubegate:auditors"],
        description="Groups that may read everyone's events through the API; others see their own.",
    )


class DatabaseSink(SinkWriter):
    name = "audit-db"

    def __init__(self, settings: AuditDbSettings, database: Database, signer: chain.Signer | None):
        super().__init__(settings)
        self.database, self.signer = database, signer

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


def signer_from(settings: AuditDbSettings, base_dir: Path) -> chain.Signer | None:
    if settings.signing_algorithm is None:
        return None
    if settings.signing_key_file is None:
        raise ValueError("signing_algorithm needs signing_key_file")
    path = settings.signing_key_file
    return chain.Signer.from_file(settings.signing_algorithm, path if path.is_absolute() else base_dir / path)


def settings_of(gateway: Gateway) -> AuditDbSettings:
    found = gateway.settings_for(PLUGIN_NAME)
    return found if isinstance(found, AuditDbSettings) else AuditDbSettings()


def database_of(gateway: Gateway, settings: AuditDbSettings) -> Database:
    if not settings.url:
        return gateway.database
    database = Database(settings.url)
    database.create_tables()  # the same migrations as the gateway's database (a behind schema stops the start)
    return database


def _sink(gateway: Gateway) -> DatabaseSink | None:
    sink = gateway.extensions.get(PLUGIN_NAME)
    return sink if isinstance(sink, DatabaseSink) else None


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return AuditDbSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    if not any(PLUGIN_NAME in c.enabled_plugins for c in gateway.connections):
        return
    settings = settings_of(gateway)
    try:
        signer = signer_from(settings, gateway.config_path.parent)
        database = database_of(gateway, settings)
    except (ValueError, DatabaseError, OperationalError) as exc:
        raise RuntimeError(f"audit-db: {exc}") from None
    if signer is not None and not signer.can_sign:
        raise RuntimeError("audit-db: the signing key can only verify (an Ed25519 public key)")
    sink = DatabaseSink(settings, database, signer)
    sink.start()
    gateway.extensions[PLUGIN_NAME] = sink
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            connection.state[PLUGIN_NAME] = sink


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    sink = _sink(gateway)
    if sink is not None:
        await sink.close()
        if sink.database is not gateway.database:
            sink.database.close()


@hookimpl
def kubegate_decide(flow: Flow) -> Decision | None:
    sink = flow.connection.state.get(PLUGIN_NAME)
    if isinstance(sink, DatabaseSink):
        sink.gate()
    return None


@hookimpl
async def kubegate_audit_event(event: AuditEvent, connection: Connection) -> None:
    sink = connection.state.get(PLUGIN_NAME)
    if isinstance(sink, DatabaseSink):
        await sink.submit(event)


@hookimpl
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    from .routes import make_blueprint

    return make_blueprint(gateway, PLUGIN_NAME)
