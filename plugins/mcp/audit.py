"""One audit event per tool call (`mcp_tool`), beside the events of the API requests it made.

The event names the tool, its arguments and reason as records keep text (masked by the masking plugin's
`kubegate_record_text`, and a manifest as `kubegate_record_body` renders a request body), the caller's
identity, the outcome and the request ids of its API requests, so `kubegate replay --user` can show the
call and what it did together.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubegate.core.attributes import RequestAttributes
from kubegate.core.flow import AuditEvent, Flow, Request

from .calls import Caller

if TYPE_CHECKING:
    from kubegate.core.connections import Connection

KIND = "mcp_tool"
REFUSED_KIND = "mcp_unauthenticated"  # a request to /mcp/NAME without a token the connection accepts


@dataclass
class ToolCall:
    tool: str
    reason: str
    arguments: dict[str, Any]
    caller: Caller
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)
    request_ids: list[str] = field(default_factory=list)


def record_flow(connection: Connection, caller: Caller, path: str) -> Flow:
    """A flow standing for the tool call, for the record hooks (they take the connection's masking)."""
    request = Request(method="POST", path=path, query="", headers=[], client_addr=caller.client[0])
    return Flow(connection=connection, request=request, attributes=RequestAttributes(path=path))


def masked_text(connection: Connection, flow: Flow, text: str) -> str:
    """Text as records keep it; with no plugin to mask it, nothing (`kubegate_record_text`)."""
    return connection.hooks.record_text(flow, text.encode()).decode(errors="replace")


def masked_arguments(connection: Connection, flow: Flow, arguments: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for key, value in arguments.items():
        if key == "manifest" and isinstance(value, str):
            # A manifest is a request body: rendered as the audit renders bodies (a Secret's data masked).
            shown[key] = _manifest_record(connection, flow, value)
        elif isinstance(value, str):
            shown[key] = masked_text(connection, flow, value)
        elif isinstance(value, list):
            shown[key] = connection.hooks.record_command(flow, [str(v) for v in value])
        else:
            shown[key] = value
    return shown


def _manifest_record(connection: Connection, flow: Flow, manifest: str) -> str | None:
    import yaml

    try:
        body = json.dumps(yaml.safe_load(manifest)).encode()
    except (yaml.YAMLError, TypeError, ValueError):
        return None  # not readable: not recorded (its size is in the API request's own event, if any)
    return connection.hooks.record_body(flow, body)


def event(connection: Connection, call: ToolCall, outcome: str, error: str) -> AuditEvent:
    flow = record_flow(connection, call.caller, f"/mcp/{connection.name}")
    data = {
        "tool": call.tool,
        "arguments": masked_arguments(connection, flow, call.arguments),
        "intent": masked_text(connection, flow, call.reason),
        "identity": call.caller.identity,
        "source": call.caller.client[0],
        "outcome": outcome,
        "error": masked_text(connection, flow, error) if error else None,
        "request_ids": [rid for rid in call.request_ids if rid],
        "latency_ms": round((time.time() - call.started) * 1000, 3),
    }
    return AuditEvent(kind=KIND, flow_id=call.id, connection=connection.name, time=call.started, data=data)
