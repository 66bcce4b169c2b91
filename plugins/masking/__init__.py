"""The `masking` plugin: secret values never reach the client in clear.

On a connection that enables it: JSON responses (objects, lists, Tables, watch streams) are masked by
structure (`objects.py`) and by value, and what goes out is always the re-serialization of the document
that was inspected (never upstream's bytes: no parser difference such as duplicate keys survives);
`pods/log` text and exec/attach output are masked by value and pattern (`text.py`); the gateway asks the
API server for JSON only, uncompressed, renders YAML itself after masking (`media.py`), answers 406 to a
client that accepts neither, and refuses (or redacts) a response it cannot parse rather than pass it. See
docs/masking.md for exactly what is masked and what is not.

Where each concern lives: `settings.py` (the config section), `masker.py` (one connection's `Masking`),
`responses.py` (HTTP responses: negotiation, the mode of each response, the body transformers), `frames.py`
(exec/attach output), `recorded.py` (what approvals, audit and recordings keep), `writes.py` (writes that
would read a masked value back); below them `objects.py`, `text.py`, `stream.py`, `known.py`, `records.py`,
`media.py`. This module is the plugin registered with the host: its hooks, and the package's public names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kubegate.core.flow import BodyTransformer, Decision, Flow, Frame, Session, Verdict
from kubegate.core.plugins import hookimpl

from . import records, scanner, writes
from .frames import WEBSOCKET_REFUSAL, is_pod_session, mask_exec_frame
from .known import KnownSecrets
from .masker import KNOWN_UP, Masking, env_name_rule
from .recorded import (
    RecordedStream,
    mask_body_for_record,
    mask_command_for_record,
    mask_query_for_record,
    mask_text_for_record,
)
from .responses import (
    Decoder,
    JsonBody,
    Text,
    WatchLines,
    Withhold,
    choose_response_mode,
    holds_no_object_data,
    json_only,
    mask_response_headers,
    parse_json,
    prepare_upstream_request,
    response_transformer,
)
from .settings import DEFAULT_ENV_NAMES, PLUGIN_NAME, ConfigMapKeys, Exempt, KnownValues, MaskingSettings

if TYPE_CHECKING:
    from kubegate.core.connections import Connection
    from kubegate.core.gateway import Gateway

__all__ = [
    "DEFAULT_ENV_NAMES",
    "PLUGIN_NAME",
    "ConfigMapKeys",
    "Decoder",
    "Exempt",
    "JsonBody",
    "KnownValues",
    "Masking",
    "MaskingSettings",
    "RecordedStream",
    "Text",
    "WatchLines",
    "Withhold",
    "env_name_rule",
    "json_only",
    "mask_body_for_record",
    "mask_command_for_record",
    "mask_query_for_record",
    "mask_text_for_record",
    "parse_json",
    "records",
    "scanner",
    "writes",
]


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return MaskingSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    for connection in gateway.connections:
        settings = connection.settings_for(PLUGIN_NAME)
        if isinstance(settings, MaskingSettings):
            masking = Masking(settings, connection.name)
            connection.state[PLUGIN_NAME] = masking
            k = settings.known_values
            if k.enabled:
                masking.known = KnownSecrets(connection, k.namespaces, k.min_length, k.max_values,
                                             k.max_value_bytes, masking.known_values_changed)  # fmt: skip
                masking.known.start()


@hookimpl
async def kubegate_decide(flow: Flow) -> Decision | None:
    """Refuse every request (503) while the known values may not be the cluster's (`known.py`,
    `on_failure: closed`); deny the writes that would read a masked Secret value back out (`writes.py`)."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    if masking is None or masking.exempt(flow.identity):
        return None
    if flow.request.websocket and not is_pod_session(flow):
        # The API server streams watches, logs and proxied answers over a WebSocket too (WatchServer,
        # StreamObject, the upgrade-aware proxy); only exec/attach output is masked frame by frame.
        return Decision(Verdict.DENY, f"masking: {WEBSOCKET_REFUSAL}", plugin="masking")
    known = masking.known
    if (
        known is not None
        and not known.healthy
        and masking.settings.known_values.on_failure == "closed"
        and not holds_no_object_data(flow)
    ):
        await known.gate()
    return await writes.decide(flow, (masking.settings.marker, masking.rules.marker_b64))


@hookimpl
def kubegate_metrics(gateway: Gateway) -> None:
    for connection in gateway.connections:
        masking = connection.state.get(PLUGIN_NAME)
        if isinstance(masking, Masking) and masking.known is not None:
            KNOWN_UP.labels(connection.name).set(0 if masking.known.problem else 1)


@hookimpl
def kubegate_readiness(connection: Connection) -> str | None:
    """Not ready while known-value masking that fails closed cannot follow the cluster's Secrets."""
    masking = connection.state.get(PLUGIN_NAME)
    if not isinstance(masking, Masking) or masking.known is None:
        return None
    problem = masking.known.problem
    if problem is None or masking.settings.known_values.on_failure != "closed":
        return None
    return f"masking: {problem}"


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    for connection in gateway.connections:
        masking = connection.state.get(PLUGIN_NAME)
        if isinstance(masking, Masking) and masking.known is not None:
            await masking.known.close()
        if isinstance(masking, Masking):
            await masking.known_index.close()


@hookimpl
def kubegate_upstream_request(flow: Flow) -> None:
    prepare_upstream_request(flow)


@hookimpl
def kubegate_response_headers(flow: Flow) -> None:
    mask_response_headers(flow)
    choose_response_mode(flow)


@hookimpl
def kubegate_response_stream(flow: Flow) -> BodyTransformer | None:
    return response_transformer(flow)


@hookimpl
def kubegate_stream_frame(flow: Flow, session: Session, frame: Frame) -> None:
    mask_exec_frame(flow, session, frame)


@hookimpl
def kubegate_record_body(flow: Flow, body: bytes) -> str | None:
    return mask_body_for_record(flow, body)


@hookimpl
def kubegate_record_query(flow: Flow, query: str) -> str | None:
    return mask_query_for_record(flow, query)


@hookimpl
def kubegate_record_command(flow: Flow, argv: list[str]) -> list[str]:
    return mask_command_for_record(flow, argv)


@hookimpl
def kubegate_record_text(flow: Flow, data: bytes) -> bytes:
    return mask_text_for_record(flow, data)


@hookimpl
def kubegate_record_stream(flow: Flow) -> RecordedStream:
    return RecordedStream(flow)


@hookimpl
def kubegate_audit_fields(flow: Flow) -> dict[str, Any]:
    """The audit event's `masking`: how the response was masked (mode, form, encoding), or that the caller
    was exempt; None when the connection does not mask."""
    return {"masking": flow.state.get(PLUGIN_NAME)}
