"""The ``agent`` connection type: an API server reached through an agent's tunnel.

The gateway holds no credential and no address for such a connection: aiohttp's pool opens its connections
as data links or SSH channels to an agent (:class:`TunnelConnector`), and everything above the socket — the
proxy, every plugin, WebSockets — is the same code as for a ``kubernetes`` connection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from kubegate.connections.registry import PooledUpstream, upstream_session
from kubegate.core.config import LimitSettings

from .settings import AgentUpstreamSettings

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler

# The host in upstream URLs of agent connections: never resolved (the connector does not use DNS); the
# agent replaces the Host header with its API server's.
TUNNEL_HOST = "agent.kubegate.invalid"
READINESS_PATH = "/.kubegate-agent/readyz"
# Who the gateway's own requests on an agent connection (the masking plugin following Secrets) act as.
# The agent forwards only impersonated requests, so there is no "the gateway's credential" here: the
# gateway names itself, and the cluster's RBAC grants this user what those requests need (for masking:
# list and watch secrets). Not a `system:` name, which the agent refuses; the proxy refuses any caller
# whose name starts with `kubegate:` (core.headers.RESERVED_USER_PREFIX), so no one else acts as it.
GATEWAY_IDENTITY = "kubegate:gateway"


class TunnelConnector(aiohttp.BaseConnector):
    """aiohttp connections to an agent serving `connection`: a data link when the tunnel has them (links.py),
    else an SSH channel."""

    def __init__(self, connection: str, allowed_agents: list[str], *, limit: int):
        super().__init__(limit=limit, limit_per_host=0, enable_cleanup_closed=False)
        self.connection = connection
        self.allowed_agents = allowed_agents

    async def _create_connection(
        self,
        req: Any,
        traces: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        from . import hub as hubs
        from .links import LINK_WAIT_SECONDS, LinkFailed
        from .ssh import asyncssh

        hub = hubs.current()
        if hub is None:
            raise aiohttp.ClientConnectionError("the agent tunnel listener is not running")
        try:
            tunnel = hub.pick(self.connection, self.allowed_agents)
        except hubs.NoAgent as exc:
            raise aiohttp.ClientConnectionError(str(exc)) from None
        connect_timeout = timeout.sock_connect or timeout.connect
        if tunnel.links_usable():
            protocol = self._factory()
            try:
                async with asyncio.timeout(min(LINK_WAIT_SECONDS, connect_timeout or LINK_WAIT_SECONDS)):
                    await tunnel.open_link(self.connection, protocol)
                return protocol
            except TimeoutError:
                tunnel.pause_links(f"none arrived within {LINK_WAIT_SECONDS:.0f} s")
            except LinkFailed as exc:
                tunnel.pause_links(str(exc))
        protocol = self._factory()
        try:
            async with asyncio.timeout(connect_timeout):
                await tunnel.open_channel(self.connection, protocol)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"agent {tunnel.agent!r} did not open a channel") from None
        except (asyncssh.Error, OSError) as exc:
            raise aiohttp.ClientConnectionError(
                f"agent {tunnel.agent!r} refused a channel: {getattr(exc, 'reason', exc)}"
            ) from None
        return protocol


class AgentUpstream(PooledUpstream):
    """Implements the registry's ``Upstream`` for a connection served by agents."""

    def __init__(self, name: str, settings: AgentUpstreamSettings, limits: LimitSettings):
        self.name = name
        self.settings = settings
        self.limits = limits
        self.base_url = f"http://{TUNNEL_HOST}"
        self.request_options: dict[str, Any] = {}

    async def start(self) -> None:
        self._session = upstream_session(
            TunnelConnector(self.name, self.settings.agents, limit=self.limits.upstream_pool_size),
            self.limits,
            # A default: every proxied request names its caller (the proxy always impersonates), and a
            # request's own Impersonate-User replaces the session's; only the gateway's own requests keep it.
            headers={"Impersonate-User": GATEWAY_IDENTITY},
        )

    def credential_headers(self) -> list[tuple[str, str]]:
        return []  # the agent adds its own; the gateway has none for this connection

    def describe(self) -> str:
        only = f" ({', '.join(self.settings.agents)})" if self.settings.agents else ""
        return f"agent tunnel{only}"

    def status(self) -> dict[str, Any]:
        """What the UI's Connections page shows: the agents serving this connection through this replica."""
        from . import hub as hubs

        hub = hubs.current()
        tunnels = [t for t in (hub.status() if hub else []) if self.name in t["connections"]]
        if self.settings.agents:
            tunnels = [t for t in tunnels if t["agent"] in self.settings.agents]
        state = "connected" if tunnels else "no agent connected"
        return {"kind": "agent", "state": state, "replica": hub.replica if hub else "", "agents": tunnels}

    async def readiness(self) -> str:
        """ "ok" when an agent serving this connection is connected and its API server answers /readyz."""
        from . import hub as hubs

        hub = hubs.current()
        try:
            if hub is None:
                return "no agent tunnel listener"
            hub.pick(self.name, self.settings.agents)
        except hubs.NoAgent:
            return "no agent connected"
        try:
            async with asyncio.timeout(3):
                response = await self.session.get(f"{self.base_url}{READINESS_PATH}")
                async with response:
                    await response.read()
                    return "ok" if response.status == 200 else f"agent: API server answered {response.status}"
        except TimeoutError:
            return "agent connected; no answer within 3 s"
        except Exception as exc:
            return f"agent connected; unreachable: {exc.__class__.__name__}"


class AgentConnectionType:
    settings_model = AgentUpstreamSettings

    def create_upstream(
        self, name: str, settings: AgentUpstreamSettings, base_dir: Path, limits: LimitSettings
    ) -> AgentUpstream:
        return AgentUpstream(name, settings, limits)
