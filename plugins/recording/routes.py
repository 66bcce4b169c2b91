"""The sessions JSON API (what the web UI will use).

    GET /api/sessions[?user=&since=&connection=&limit=]   sessions the caller may see, newest first
    GET /api/sessions/ID                                  one session's metadata, exit status included
    GET /api/sessions/ID/cast                             its recording (application/x-asciicast)

Callers authenticate with a bearer token that a connection with recording accepts (a `kubegate login`
token, say). Everyone sees their own sessions; members of `readers` groups see everyone's, on the
connections that accept their token.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from quart import Blueprint, Response, request

from kubegate.core.flow import Identity
from kubegate.core.routes import NO_STORE, authenticate_caller, caller_identities, json_response, unauthorized
from kubegate.core.since import SinceError, parse_since

from . import store
from .recorder import Recorder
from .storage import RecordingMissing, read_cast

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

CAST_MEDIA_TYPE = "application/x-asciicast"


def make_blueprint(gateway: Gateway, recorder: Recorder, plugin: str, *, readers: list[str]) -> Blueprint:
    bp = Blueprint("recording", __name__)
    database = recorder.database
    reader_groups = set(readers)

    def connections() -> list[Connection]:
        return [c for c in gateway.connections if plugin in c.enabled_plugins]

    def may_read_all(who: Identity) -> bool:
        return bool(reader_groups & set(who.groups))

    def visible(record: store.SessionRecord, who: Identity) -> bool:
        return record.user == who.user or may_read_all(who)

    async def identities() -> dict[str, Identity]:
        """The caller on every connection with this plugin that accepts their token."""
        return await caller_identities(connections())

    @bp.get("/api/sessions")
    async def list_sessions() -> Response:
        who = await identities()
        if not who:
            return unauthorized()
        since = None
        if request.args.get("since"):
            try:
                since = parse_since(request.args["since"])
            except SinceError as exc:
                return json_response({"error": str(exc)}, 400)
        try:
            limit = min(max(int(request.args.get("limit", "200")), 1), 1000)
        except ValueError:
            return json_response({"error": "limit must be a number"}, 400)
        wanted = request.args.get("connection")
        # Narrowed in the query (`limit` counts only sessions the caller may see): every session of the
        # connections where they are a reader, their own on the others that accept their token.
        readable = {
            name: None if may_read_all(identity) else identity.user
            for name, identity in who.items()
            if not wanted or name == wanted
        }
        user = request.args.get("user") or None
        records = await database.run(
            lambda s: store.list_sessions(s, user=user, since=since, readable=readable, limit=limit)
        )
        items = [r.public() for r in records if visible(r, who[r.connection])]
        return json_response({"items": items})

    async def one(session_id: str) -> store.SessionRecord | Response:
        record = await database.run(lambda s: store.get(s, session_id))
        connection = gateway.connections.get(record.connection) if record else None
        if record is None or connection is None or plugin not in connection.enabled_plugins:
            # Before authentication, the same answer as "unknown": IDs are not confirmed to strangers.
            if not await identities():
                return unauthorized()
            return json_response({"error": f"no session {session_id}"}, 404)
        answer = await authenticate_caller(connection)
        if not isinstance(answer, Identity):
            return unauthorized()
        if not visible(record, answer):
            return json_response({"error": f"session {session_id} is not yours to see"}, 403)
        return record

    @bp.get("/api/sessions/<session_id>")
    async def show(session_id: str) -> Response:
        found = await one(session_id)
        if isinstance(found, Response):
            return found
        return json_response(found.public())

    @bp.get("/api/sessions/<session_id>/cast")
    async def cast(session_id: str) -> Response:
        found = await one(session_id)
        if isinstance(found, Response):
            return found
        try:
            text = await asyncio.to_thread(read_cast, database, found, gateway.settings_for(plugin))
        except RecordingMissing as exc:
            return json_response({"error": str(exc)}, 404)
        response = Response(text, status=200, content_type=CAST_MEDIA_TYPE)
        response.headers.update(NO_STORE)
        response.headers["Content-Disposition"] = f'attachment; filename="{found.id}.cast"'
        return response

    return bp
