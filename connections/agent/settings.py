"""Settings of the agent tunnel: the gateway-wide ``plugins.agents`` block and a ``type: agent`` connection's
``upstream`` block."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

PLUGIN_NAME = "agents"
DEFAULT_PORT = 8022


class AgentGatewaySettings(BaseModel):
    """``plugins.agents``: where agents dial in, and how this replica is known to them."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(
        None, description="HOST:PORT of the SSH listener agents dial; default: the gateway's host, port 8022."
    )
    host_key_file: Path | None = Field(
        None,
        description="OpenSSH private key the gateway proves itself with. Default: generated once and kept in "
        "the database, so every replica presents the same key.",
    )
    replica: str | None = Field(
        None, description="This replica's name in `kubegate agents list`; default: hostname:port."
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="SSH keepalive and database heartbeat interval; 3 missed = disconnected."
    )
    links: bool = Field(
        True,
        description="Carry requests over data links (TLS connections the agent opens on request, on the same "
        "port, checked against the same host key) instead of SSH channels: about twice as fast per request. "
        "false: SSH channels only.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; ValueError with the expected form otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, e.g. 0.0.0.0:{DEFAULT_PORT} (got {value!r})")
    return host.strip("[]"), int(port)


class AgentUpstreamSettings(BaseModel):
    """``connections.NAME.upstream`` of a ``type: agent`` connection."""

    model_config = ConfigDict(extra="forbid")

    agents: list[str] = Field(
        default_factory=list,
        description="Agents that may serve this connection; empty: any agent enrolled for it.",
    )
