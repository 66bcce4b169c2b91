"""The connection registry: named upstreams and the plugins enabled on each.

Part of core (``kubegate.connections.registry`` re-exports it for connection types and older imports):
core builds and serves connections, connection types only plug into it.

A connection type (registered through the ``kubegate_connection_types`` hook) validates the ``upstream``
block of a connection and builds an :class:`Upstream`; the registry builds one :class:`Connection` per
config entry, with its plugin settings validated and its hook caller computed once per config load.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from pydantic import BaseModel, ValidationError

from .config import ConfigError, GatewaySettings, LimitSettings, first_error
from .people import PeopleResolver

if TYPE_CHECKING:
    from .plugins import ConnectionHooks, PluginHost


class SettingError(Exception):
    """A connection type's complaint about one key of its upstream block."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


class Upstream(Protocol):
    """Where a connection's requests go, and with which credential."""

    base_url: str  # scheme://host:port[/prefix], no trailing slash
    request_options: dict[
        str, Any
    ]  # extra keyword arguments for every aiohttp request (e.g. server_hostname)

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def credential_headers(self) -> list[tuple[str, str]]:
        """Headers that carry the gateway's own credential (e.g. a bearer token), read fresh when rotated."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


def upstream_session(
    connector: aiohttp.BaseConnector, limits: LimitSettings, **options: Any
) -> aiohttp.ClientSession:
    """The pooled aiohttp session a connection type gives the proxy: no time cut on bodies (watches, `logs -f`),
    bodies passed through as bytes (gzip stays gzip), no header invented for the client, no cookies kept.
    WebSocket upgrades go through a sibling on the same pool that keeps the body of a refused upgrade, so
    the client sees the API server's own message (core/relay.py `websocket_session`)."""
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=limits.upstream_connect_timeout_seconds,
            sock_connect=limits.upstream_connect_timeout_seconds,
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
        cookie_jar=aiohttp.DummyCookieJar(),
        **options,
    )


class PooledUpstream:
    """The session lifecycle every built-in upstream shares: `start` sets ``_session`` (see
    :func:`upstream_session`), `close` ends it; using it before `start` is a programming error."""

    name: str
    _session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream of connection {self.name!r} is not started")
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ConnectionType(Protocol):
    """A kind of connection (``type:`` in the config)."""

    @property
    def settings_model(self) -> type[BaseModel]:
        """The pydantic model that validates the connection's ``upstream`` block."""
        ...

    def create_upstream(self, name: str, settings: Any, base_dir: Path, limits: LimitSettings) -> Upstream:
        """Build the upstream from validated settings; raise :class:`SettingError` for a bad value."""
        ...


@dataclass
class Connection:
    """One configured connection, reachable at ``/k8s/NAME/``."""

    name: str
    type: str
    description: str
    upstream: Upstream
    hooks: ConnectionHooks
    plugin_settings: dict[str, BaseModel | None] = field(default_factory=dict)
    limits: LimitSettings = field(default_factory=LimitSettings)
    # Objects plugins attach to this connection at startup (a service shared with the gateway), by plugin
    # name; per-request state belongs on the flow instead.
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled_plugins(self) -> list[str]:
        return sorted(self.plugin_settings)

    def settings_for(self, plugin: str) -> Any:
        """The validated settings of `plugin` on this connection (None when it has no settings model)."""
        return self.plugin_settings.get(plugin)


class ConnectionRegistry:
    """All connections of a loaded config, by name."""

    def __init__(self, connections: dict[str, Connection]):
        self._connections = connections

    def get(self, name: str) -> Connection | None:
        return self._connections.get(name)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self._connections.values())

    def __len__(self) -> int:
        return len(self._connections)

    @property
    def names(self) -> list[str]:
        return list(self._connections)

    async def start(self) -> None:
        for connection in self._connections.values():
            await connection.upstream.start()

    async def close(self) -> None:
        for connection in self._connections.values():
            await connection.upstream.close()


def build_registry(settings: GatewaySettings, config_path: Path, host: PluginHost) -> ConnectionRegistry:
    """Validate every connection block against its type and its plugins; raise ConfigError on the first
    problem, naming the key."""
    types = host.connection_types()
    models = host.plugin_settings_models()
    installed = set(host.names)
    base_dir = config_path.parent
    people = PeopleResolver(settings.people)  # one person per identity, the same on every connection
    connections: dict[str, Connection] = {}
    for name, conn in settings.connections.items():
        key = f"connections.{name}"
        ctype = types.get(conn.type)
        if ctype is None:
            known = ", ".join(sorted(types)) or "none"
            raise ConfigError(
                config_path, f"{key}.type", f"unknown connection type {conn.type!r} (known: {known})"
            )
        try:
            upstream_settings = ctype.settings_model.model_validate(conn.upstream)
        except ValidationError as exc:
            where, reason = first_error(exc, f"{key}.upstream")
            raise ConfigError(config_path, where, reason) from None
        try:
            upstream = ctype.create_upstream(name, upstream_settings, base_dir, settings.limits)
        except SettingError as exc:
            raise ConfigError(config_path, f"{key}.upstream.{exc.key}", exc.reason) from None
        plugin_settings: dict[str, BaseModel | None] = {}
        for plugin_name, raw in conn.plugins.items():
            if plugin_name not in installed:
                known = ", ".join(sorted(installed))
                close = difflib.get_close_matches(plugin_name, sorted(installed), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    config_path, f"{key}.plugins.{plugin_name}", f"no such plugin ({hint}installed: {known})"
                )
            model = models.get(plugin_name)
            if model is None:
                if raw:
                    raise ConfigError(
                        config_path, f"{key}.plugins.{plugin_name}", "this plugin takes no settings"
                    )
                plugin_settings[plugin_name] = None
                continue
            try:
                plugin_settings[plugin_name] = model.model_validate(raw or {}, context={"base_dir": base_dir})
            except ValidationError as exc:
                where, reason = first_error(exc, f"{key}.plugins.{plugin_name}")
                raise ConfigError(config_path, where, reason) from None
        connections[name] = Connection(
            name=name,
            type=conn.type,
            description=conn.description,
            upstream=upstream,
            hooks=host.for_connection(plugin_settings, people),
            plugin_settings=plugin_settings,
            limits=settings.limits,
        )
    return ConnectionRegistry(connections)
