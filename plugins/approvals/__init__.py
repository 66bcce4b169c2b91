"""The `approvals` plugin: requests the policy marks "approve" are held until reviewers decide.

Enable it on a connection next to `policy` (`connections.NAME.plugins.approvals: {}`). The held client
gets the real response once the request is approved, a 403 `Status` with the reviewer's reason when it
is denied, or 403 "approval expired". Reviewers use the JSON API (`/api/approvals`) or
`kubegate approvals`; time-window grants are listed and revoked with `kubegate grants`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.flow import Decision, Flow
from kubegate.core.plugins import hookimpl

from .service import ApprovalService

if TYPE_CHECKING:
    from quart import Blueprint

    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "approvals"


class ApprovalsSettings(BaseModel):
    """Per connection: `connections.NAME.plugins.approvals`."""

    model_config = ConfigDict(extra="forbid")

    observers: list[str] = Field(
        default_factory=list,
        description="Groups that may see every held request of this connection without reviewing it "
        "(auditors); reviewers see the requests they may review, everyone their own.",
    )


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return ApprovalsSettings


def service_of(gateway: Gateway) -> ApprovalService:
    service = gateway.extensions.get(PLUGIN_NAME)
    if service is None:
        service = ApprovalService(gateway.database, gateway.connections)
        gateway.extensions[PLUGIN_NAME] = service
    return service


def _enabled(gateway: Gateway) -> bool:
    return any(PLUGIN_NAME in c.enabled_plugins for c in gateway.connections)


@hookimpl
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    if not _enabled(gateway):
        return None
    from .routes import make_blueprint

    return make_blueprint(gateway, service_of(gateway), PLUGIN_NAME)


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            connection.state[PLUGIN_NAME] = service_of(gateway)


@hookimpl
async def kubegate_approval(flow: Flow, decision: Decision) -> Decision | None:
    service = flow.connection.state.get(PLUGIN_NAME)
    if service is None:
        return None
    return await service.hold(flow, decision)
