"""The `mcp` plugin: a Model Context Protocol endpoint at `/mcp/NAME` for autonomous agents.

Enable it on a connection (`connections.NAME.plugins.mcp: {}`). Agents authenticate with the tokens the
connection accepts and call tools (`list_resources`, `get_resource`, `describe`, `logs`, `apply`, `delete`,
`scale`, `rollout_restart`, `exec`); each tool call becomes Kubernetes API requests through the gateway's own
data path, with the agent's token, so policy, approvals, masking, impersonation, recording and audit apply
exactly as for kubectl (docs/agents.md). Needs the `mcp` package (`pip install 'kubegate[mcp]'`).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.errors import ConfigError
from kubegate.core.plugins import hookimpl

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "mcp"
NOT_INSTALLED = "needs the `mcp` package, which is not installed: pip install 'kubegate[mcp]'"


class McpSettings(BaseModel):
    """Per connection: `connections.NAME.plugins.mcp`."""

    model_config = ConfigDict(extra="forbid")

    max_result_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="The largest API answer a tool reads (a larger one is an error asking to narrow the call).",
    )  # fmt: skip
    max_log_lines: int = Field(500, ge=1, le=100_000, description="`logs` returns at most this many lines.")
    max_log_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="... and at most this many bytes."
    )
    max_exec_output_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="`exec` keeps at most this much stdout and stderr.",
    )
    max_exec_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description="`exec` closes the session after this long (not counting an approval wait).",
    )
    progress_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description="While a request waits (held for approval), a progress notification this often.",
    )
    field_manager: str = Field(
        "kubegate-mcp", min_length=1, max_length=128, description="The fieldManager of `apply`."
    )


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return McpSettings


def _enabled_on(gateway: Gateway) -> list[str]:
    return [c.name for c in gateway.connections if PLUGIN_NAME in c.enabled_plugins]


@hookimpl
async def kubegate_startup(gateway: Gateway) -> None:
    enabled = _enabled_on(gateway)
    if not enabled:
        return
    if importlib.util.find_spec("mcp") is None:
        raise ConfigError(
            gateway.config_path, f"connections.{enabled[0]}.plugins.{PLUGIN_NAME}", NOT_INSTALLED
        )
    from .endpoint import Endpoint

    endpoint = Endpoint(gateway, PLUGIN_NAME)
    await endpoint.start()
    gateway.extensions[PLUGIN_NAME] = endpoint
    # `/mcp/` is served in front of the gateway's (Quart) application, as ASGI middleware: the SDK's
    # transport is an ASGI application, and the API path `/k8s/` never passes here.
    app: Any = gateway.app
    app.asgi_app = endpoint.wrap(app.asgi_app)


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    endpoint = gateway.extensions.pop(PLUGIN_NAME, None)
    if endpoint is not None:
        await endpoint.stop()
