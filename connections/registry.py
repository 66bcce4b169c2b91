"""The connection registry lives in core (:mod:`kubegate.core.connections`); connection types import it from
here or from there. Connections import core, never plugins."""

from kubegate.core.connections import (
    Connection,
    ConnectionRegistry,
    ConnectionType,
    PooledUpstream,
    SettingError,
    Upstream,
    build_registry,
    upstream_session,
)

__all__ = [
    "Connection",
    "ConnectionRegistry",
    "ConnectionType",
    "PooledUpstream",
    "SettingError",
    "Upstream",
    "build_registry",
    "upstream_session",
]
