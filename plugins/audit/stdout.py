"""The `audit-stdout` plugin: one JSON line per audit event on standard output (for a log collector that
reads the container's output). No chain: the collector's store is where tamper evidence must live."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from kubegate.core.flow import AuditEvent, Decision, Flow
from kubegate.core.plugins import hookimpl

from .sink import SinkSettings, SinkWriter

if TYPE_CHECKING:
    from pydantic import BaseModel

    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-stdout"


class StdoutSink(SinkWriter):
    name = "audit-stdout"

    def write(self, batch: list[dict[str, Any]]) -> None:
        sys.stdout.write(
            "".join(json.dumps({"audit": r}, separators=(",", ":"), default=str) + "\n" for r in batch)
        )
        sys.stdout.flush()


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return SinkSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    if not any(PLUGIN_NAME in c.enabled_plugins for c in gateway.connections):
        return
    found = gateway.settings_for(PLUGIN_NAME)
    sink = StdoutSink(found if isinstance(found, SinkSettings) else SinkSettings())
    sink.start()
    gateway.extensions[PLUGIN_NAME] = sink
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            connection.state[PLUGIN_NAME] = sink


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    sink = gateway.extensions.get(PLUGIN_NAME)
    if isinstance(sink, StdoutSink):
        await sink.close()


@hookimpl
def kubegate_decide(flow: Flow) -> Decision | None:
    sink = flow.connection.state.get(PLUGIN_NAME)
    if isinstance(sink, StdoutSink):
        sink.gate()
    return None


@hookimpl
async def kubegate_audit_event(event: AuditEvent, connection: Connection) -> None:
    sink = connection.state.get(PLUGIN_NAME)
    if isinstance(sink, StdoutSink):
        await sink.submit(event)
