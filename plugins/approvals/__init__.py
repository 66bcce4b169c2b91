"""The `approvals` plugin: requests the policy marks "approve" are held until reviewers decide.

Enable it on a connection next to `policy` (`connections.NAME.plugins.approvals: {}`). The held client
gets the real response once the request is approved, a 403 `Status` with the reviewer's reason when it
is denied, or 403 "approval expired". Reviewers use the JSON API (`/api/approvals`) or
`kubegate approvals`; time-window grants are listed and revoked with `kubegate grants`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.flow import Decision, Flow
from kubegate.core.observe import REGISTRY
from kubegate.core.plugins import hookimpl

from .service import ApprovalService

if TYPE_CHECKING:
    from quart import Blueprint
    from sqlmodel import SQLModel

    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "approvals"
# Read from the database before each scrape (the latest reading wins across workers).
PENDING_APPROVALS = Gauge("kubegate_pending_approvals", "Requests held for a reviewer now.", registry=REGISTRY,
                          multiprocess_mode="livemostrecent")  # fmt: skip


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
    service: ApprovalService | None = flow.connection.state.get(PLUGIN_NAME)
    if service is None:
        return None
    return await service.hold(flow, decision)


@hookimpl
def kubegate_audit_fields(flow: Flow) -> dict[str, Any]:
    """The audit event's `approval`: the approval request or grant that let the request through (or
    refused it), None when it was not held."""
    return {"approval": flow.state.get("approval")}


@hookimpl
def kubegate_database_models() -> list[type[SQLModel]]:
    from . import store

    return [store.ApprovalRecord, store.GrantRecord]


@hookimpl
async def kubegate_metrics(gateway: Gateway) -> None:
    if gateway.extensions.get(PLUGIN_NAME) is None:
        return
    from . import store

    PENDING_APPROVALS.set(await gateway.database.run(store.count_pending))
