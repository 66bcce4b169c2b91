"""The built-in plugin ``agents``: registers the ``agent`` connection type and the gateway-wide settings, and
starts the SSH listener with the gateway when a config has agent connections or a ``plugins.agents`` block."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kubegate.core.plugins import hookimpl

from .settings import DEFAULT_PORT, PLUGIN_NAME, AgentGatewaySettings, split_host_port
from .upstream import AgentConnectionType

if TYPE_CHECKING:
    from sqlmodel import SQLModel

    from kubegate.core.connections import ConnectionType
    from kubegate.core.gateway import Gateway

__all__ = ["PLUGIN_NAME"]


@hookimpl
def kubegate_connection_types() -> dict[str, ConnectionType]:
    return {"agent": AgentConnectionType()}


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel] | None:
    return AgentGatewaySettings


@hookimpl
def kubegate_database_models() -> list[type[SQLModel]]:
    from . import store

    return [store.JoinTokenRecord, store.AgentRecord, store.AgentSessionRecord, store.HostKeyRecord]


def listen_address(gateway: Gateway) -> tuple[str, int]:
    """Where the SSH listener binds: ``plugins.agents.listen``, else the gateway's host on port 8022."""
    settings: AgentGatewaySettings | None = gateway.settings_for(PLUGIN_NAME)
    if settings is not None and settings.listen:
        return split_host_port(settings.listen)
    host, _ = split_host_port(gateway.settings.listen)
    return host, DEFAULT_PORT


def _wanted(gateway: Gateway) -> bool:
    return gateway.settings_for(PLUGIN_NAME) is not None or any(
        c.type == "agent" for c in gateway.connections
    )


@hookimpl
async def kubegate_startup(gateway: Gateway) -> None:
    if not _wanted(gateway):
        return
    from kubegate.core.config import worker_count
    from kubegate.core.errors import ConfigError

    if worker_count(gateway.settings) > 1:
        # One SSH listener per port, and a tunnel ends in the one process that accepted it (docs/operations.md).
        raise ConfigError(gateway.config_path, "workers", "agent connections need workers: 1 for now")
    from . import hub as hubs
    from .keys import gateway_host_key
    from .metrics import register

    register()

    settings: AgentGatewaySettings = gateway.settings_for(PLUGIN_NAME) or AgentGatewaySettings()
    host, port = listen_address(gateway)

    def make_hub(host_key: Any) -> hubs.Hub:
        return hubs.Hub(
            host=host,
            port=port,
            host_key=host_key,
            database=gateway.database,
            replica=settings.replica or hubs.default_replica_name(port),
            heartbeat_seconds=settings.heartbeat_seconds,
            links=settings.links,
        )

    if hubs.current() is None:
        key = await asyncio.to_thread(
            gateway_host_key, settings, gateway.config_path.parent, gateway.database
        )
        hub = await hubs.acquire(lambda: make_hub(key))
    else:
        hub = await hubs.acquire(lambda: make_hub(None))  # already running: the factory is not called
    gateway.extensions[PLUGIN_NAME] = hub


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    hub = gateway.extensions.pop(PLUGIN_NAME, None)
    if hub is not None:
        from . import hub as hubs

        await hubs.release(hub)
