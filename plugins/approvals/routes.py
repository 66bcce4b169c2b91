"""The reviewers' JSON API (also what the web UI will use).

    GET  /api/approvals[?state=pending|approved|denied|expired|used|all]   requests the caller may see
                                      (each body's start: `body_preview`, `body_truncated`)
    GET  /api/approvals/ID            one request, with its whole (masked) `body` and its `media_type`
    POST /api/approvals/ID/approve   {"comment": "..."}
    POST /api/approvals/ID/deny      {"comment": "..."}
    GET  /api/grants[?all=1]          time-window grants: the caller's own and those they may revoke
    POST /api/grants/ID/revoke        the grant's reviewers and the UI's admins

Callers authenticate with a bearer token that the request's connection accepts (a `kubegate login`
token, say): reviewers see the requests they may review, everyone sees their own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from quart import Blueprint, Response, request

from kubegate.core.flow import Identity
from kubegate.core.routes import authenticate_caller, caller_identities, json_response, unauthorized

from . import store
from .service import ApprovalService, ReviewError

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

STATES = {store.PENDING, store.APPROVED, store.DENIED, store.EXPIRED, store.USED}


def visible(record: store.ApprovalRecord, who: Identity, observers: list[str] | None = None) -> bool:
    groups = set(who.groups)
    return who.user == record.requester or bool(groups & (set(record.reviewer_groups) | set(observers or [])))


def make_blueprint(gateway: Gateway, service: ApprovalService, plugin: str) -> Blueprint:
    bp = Blueprint("approvals", __name__)

    def observers(connection_name: str) -> list[str]:
        connection = gateway.connections.get(connection_name)
        settings = connection.settings_for(plugin) if connection is not None else None
        return list(getattr(settings, "observers", None) or [])

    def connections() -> list[Connection]:
        return [c for c in gateway.connections if plugin in c.enabled_plugins]

    async def identities() -> dict[str, Identity]:
        """The caller on every connection with this plugin that accepts their token."""
        return await caller_identities(connections())

    @bp.get("/api/approvals")
    async def list_approvals() -> Response:
        who = await identities()
        if not who:
            return unauthorized()
        wanted = request.args.get("state", store.PENDING)
        if wanted != "all" and wanted not in STATES:
            return json_response({"error": f"state must be one of {', '.join(sorted(STATES))} or all"}, 400)
        states = None if wanted == "all" else [wanted]
        records = await service.db.run(
            lambda s: store.list_approvals(s, states=states, connections=list(who))
        )
        items = [r.listed() for r in records if visible(r, who[r.connection], observers(r.connection))]
        return json_response({"items": items})

    async def one(approval_id: str) -> tuple[store.ApprovalRecord | None, Identity | Response]:
        record = await service.db.run(lambda s: store.get(s, approval_id))
        connection = gateway.connections.get(record.connection) if record else None
        if record is None or connection is None:
            return None, json_response({"error": f"no approval request {approval_id}"}, 404)
        answer = await authenticate_caller(connection)
        if not isinstance(answer, Identity):
            return None, unauthorized()
        if not visible(record, answer, observers(record.connection)):
            return None, json_response({"error": f"no approval request {approval_id}"}, 404)
        return record, answer

    @bp.get("/api/approvals/<approval_id>")
    async def show(approval_id: str) -> Response:
        record, who = await one(approval_id)
        if record is None:
            assert isinstance(who, Response)
            return who
        return json_response(record.public())

    async def review(approval_id: str, approve: bool) -> Response:
        record, who = await one(approval_id)
        if record is None:
            assert isinstance(who, Response)
            return who
        assert isinstance(who, Identity)
        body = await request.get_json(force=True, silent=True)
        comment = str(body.get("comment", "")) if isinstance(body, dict) else ""
        try:
            updated = await service.review(approval_id, who, approve, comment)
        except ReviewError as exc:
            return json_response({"error": exc.message}, exc.status)
        return json_response(updated.public())

    @bp.post("/api/approvals/<approval_id>/approve")
    async def approve(approval_id: str) -> Response:
        return await review(approval_id, True)

    @bp.post("/api/approvals/<approval_id>/deny")
    async def deny(approval_id: str) -> Response:
        return await review(approval_id, False)

    # -- grants (time windows an approval opened) ----------------------------------------------------------

    def may_revoke(grant: store.GrantRecord, who: Identity, approval: store.ApprovalRecord | None) -> bool:
        """The grant's reviewers (the groups of the approval that opened it) and the UI's admins."""
        admins = set(getattr(gateway.settings_for("ui"), "admins", None) or [])
        groups = set(who.groups)
        return bool(groups & admins) or bool(approval is not None and groups & set(approval.reviewer_groups))

    @bp.get("/api/grants")
    async def list_grants() -> Response:
        who = await identities()
        if not who:
            return unauthorized()
        include_inactive = request.args.get("all") == "1"
        grants = await service.db.run(lambda s: store.list_grants(s, include_inactive=include_inactive))
        approvals = await service.db.run(
            lambda s: {g.approval_id: store.get(s, g.approval_id) for g in grants}
        )
        now = time.time()
        items = []
        for grant in grants:
            caller = who.get(grant.connection)
            if caller is None:
                continue
            revoke = may_revoke(grant, caller, approvals.get(grant.approval_id))
            if not revoke and caller.user != grant.user:
                continue  # people see their own grants and those they may revoke
            items.append({**grant.model_dump(), "state": grant.state(now), "can_revoke": revoke})
        return json_response({"items": items})

    @bp.post("/api/grants/<grant_id>/revoke")
    async def revoke_grant(grant_id: str) -> Response:
        who = await identities()
        if not who:
            return unauthorized()
        grant = await service.db.run(lambda s: s.get(store.GrantRecord, grant_id))
        caller = who.get(grant.connection) if grant is not None else None
        if grant is None or caller is None:
            return json_response({"error": f"no grant {grant_id}"}, 404)
        approval = await service.db.run(lambda s: store.get(s, grant.approval_id))
        if not may_revoke(grant, caller, approval):
            return json_response({"error": "only the grant's reviewers and admins may revoke it"}, 403)
        revoked = await service.db.run(lambda s: store.revoke_grant(s, grant_id, caller.user))
        if revoked is None:
            return json_response({"error": f"grant {grant_id} is no longer active"}, 409)
        return json_response({**revoked.model_dump(), "state": revoked.state(time.time())})

    return bp
