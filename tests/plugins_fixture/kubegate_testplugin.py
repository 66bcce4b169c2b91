"""A third-party plugin used by the end-to-end tests, installed through the `kubegate` entry-point group
(see the dist-info folder beside it), to prove that hooks run only where a connection enables them."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from kubegate.connections.registry import Connection
from kubegate.core import hookimpl
from kubegate.core.flow import AuditEvent, Decision, Flow, Frame, Session

PLUGIN_NAME = "testplugin"


class Settings(BaseModel):
    audit_file: Path
    deny_message: str = "namespaces cannot be deleted through this gateway"


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return Settings


def _settings(flow: Flow) -> Settings:
    return flow.connection.settings_for(PLUGIN_NAME)


@hookimpl
async def kubegate_decide(flow: Flow) -> Decision | None:
    a = flow.attributes
    if a.resource == "namespaces" and a.verb in ("delete", "deletecollection"):
        return Decision.deny(_settings(flow).deny_message, rule="no-namespace-deletes")
    if a.resource == "configmaps" and a.verb == "create":
        body = await flow.request.read_body()  # a plugin may read the body; the request still goes upstream
        flow.state[PLUGIN_NAME] = len(body)
    if flow.request.header("x-test-explode"):
        raise RuntimeError("decision plugin crashed")
    return None


@hookimpl
def kubegate_upstream_request(flow: Flow) -> None:
    if flow.request.header("x-test-smuggle"):
        # A misbehaving plugin: the host must refuse to send this.
        flow.upstream_headers.append(("Impersonate-Group", "system:masters"))


@hookimpl
def kubegate_response_headers(flow: Flow) -> None:
    flow.response.headers.append(("X-Kubegate-Test", "on"))
    if PLUGIN_NAME in flow.state:
        flow.response.headers.append(("X-Kubegate-Body-Bytes", str(flow.state[PLUGIN_NAME])))


class Upper:
    """Upper-cases a log stream as it flows (a stateless per-chunk transformer)."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def end(self) -> bytes:
        return b""


@hookimpl
def kubegate_response_stream(flow: Flow) -> Upper | None:
    if flow.attributes.subresource == "log" and flow.request.header("x-test-upper"):
        return Upper()
    return None


@hookimpl
def kubegate_stream_frame(flow: Flow, session: Session, frame: Frame) -> None:
    # Rewrite stdout of exec sessions: proves frames pass through the hook in the right direction.
    if frame.direction == "upstream_to_client" and frame.channel == 1:
        frame.data = frame.data.replace(b"secret", b"******")


@hookimpl
def kubegate_audit_event(event: AuditEvent, connection: Connection) -> None:
    settings: Settings = connection.settings_for(PLUGIN_NAME)
    record = {"kind": event.kind, "connection": event.connection, "flow_id": event.flow_id, **event.data}
    with settings.audit_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
