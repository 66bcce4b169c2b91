"""agent.yaml: which gateways the agent dials, who it is, and the clusters it serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubegate.connections.agent.settings import split_host_port
from kubegate.connections.kubernetes import (
    KubernetesConnectionType,
    KubernetesUpstream,
    KubernetesUpstreamSettings,
)
from kubegate.connections.registry import SettingError
from kubegate.core.config import LimitSettings, read_model, resolve
from kubegate.core.errors import ConfigError

AGENT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="This agent's name, unique per gateway (a DNS-like label).")
    gateways: list[str] = Field(
        min_length=1,
        description="HOST:PORT of the gateway's agent listener; a name is resolved and every address dialed "
        "(one tunnel per gateway replica).",
    )
    gateway_host_key: str = Field(description="The gateway's SSH host-key fingerprint (SHA256:...), pinned.")
    identity_file: Path = Field(description="This agent's private key; created at enrolment when missing.")
    join_token_file: Path | None = Field(None, description="A join token, read at the first start only.")
    connections: dict[str, KubernetesUpstreamSettings] = Field(
        min_length=1, description="The clusters this agent serves, by the gateway's connection name."
    )
    allow_system_impersonation: list[str] = Field(
        default_factory=list,
        description="Patterns (fnmatch) of system: users and groups the agent will impersonate; default none.",
    )
    audit_log: Path | None = Field(None, description="Also append one JSON line per request to this file.")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    max_backoff_seconds: float = Field(30.0, gt=0, description="Longest wait between reconnection attempts.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not AGENT_NAME.match(value):
            raise ValueError("must be a lowercase DNS-like name (a-z, 0-9, '-', '.')")
        return value

    @field_validator("gateways")
    @classmethod
    def _gateways(cls, value: list[str]) -> list[str]:
        for item in value:
            split_host_port(item)
        return value

    @field_validator("gateway_host_key")
    @classmethod
    def _fingerprint(cls, value: str) -> str:
        if not FINGERPRINT.match(value):
            raise ValueError("must be the SHA256:... fingerprint `kubegate agents join-token` prints")
        return value


def load_agent_settings(path: Path) -> AgentSettings:
    """Read and validate agent.yaml; raises ConfigError naming the file, key and reason."""
    settings = read_model(path, AgentSettings)
    base = path.parent
    settings.identity_file = resolve(base, settings.identity_file)
    if settings.join_token_file:
        settings.join_token_file = resolve(base, settings.join_token_file)
    if settings.audit_log:
        settings.audit_log = resolve(base, settings.audit_log)
    return settings


def cluster_upstreams(settings: AgentSettings, path: Path) -> dict[str, KubernetesUpstream]:
    """The API server (address + the agent's credential) of each served connection."""
    ctype = KubernetesConnectionType()
    limits = LimitSettings()
    out: dict[str, KubernetesUpstream] = {}
    for name, block in settings.connections.items():
        try:
            out[name] = ctype.create_upstream(name, block, path.parent, limits)
        except SettingError as exc:
            raise ConfigError(path, f"connections.{name}.{exc.key}", exc.reason) from None
    return out
