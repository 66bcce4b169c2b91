"""The audit JSON API (for auditors' tools and the web UI).

    GET /api/audit/events?user=&group=&connection=&verb=&resource=&namespace=&decision=&kind=&since=&until=
                          &command=&session=&seq=&limit=     matching events, oldest first
    GET /api/audit/commands?…same filters…              API calls grouped by kubectl invocation
    GET /api/audit/export?…same filters…                JSON lines with chain fields
    GET /api/audit/verify                               the chain's state (readers only)

Callers authenticate with a bearer token a connection with `audit-db` accepts. On each connection that
accepts it, members of the `readers` groups see every event and anyone else only their own; they see no
event of a connection that does not accept the token.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request

from kubegate.core.routes import caller_identities, json_response
from kubegate.core.since import parse_since

from . import store

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

FILTERS = ("user", "group", "connection", "verb", "resource", "namespace", "decision", "kind", "command",
           "session")  # fmt: skip


def filters_from(args: Any) -> store.Filters:
    """Query parameters → filters; raises ValueError with a message for a bad value."""
    filters = store.Filters(**{name: args.get(name) or None for name in FILTERS})
    if args.get("since"):
        filters.since = parse_since(args["since"])
    if args.get("until"):
        filters.until = parse_since(args["until"])
    if args.get("seq"):
        filters.seq = int(args["seq"])
    return filters


def make_blueprint(gateway: Gateway, plugin: str) -> Blueprint:
    from .database import DatabaseSink, settings_of

    bp = Blueprint("audit", __name__)

    async def scope() -> tuple[store.Filters, DatabaseSink, bool] | Response:
        """The caller's filters, narrowed to what they may read; or the error response."""
        sink = gateway.extensions.get(plugin)
        if not isinstance(sink, DatabaseSink):
            return json_response({"error": "audit-db is not enabled on any connection"}, 404)
        who = await caller_identities([c for c in gateway.connections if plugin in c.enabled_plugins])
        if not who:
            return json_response({"error": "Unauthorized: send a token a connection accepts"}, 401)
        try:
            filters = filters_from(request.args)
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, 400)
        if filters.connection and filters.connection not in who:
            return json_response({"error": f"no access to connection {filters.connection!r}"}, 403)
        # Per connection that accepts the token: every event where the caller is in `readers`, their own
        # elsewhere; nothing of a connection that does not accept it. The query narrows, not the answer, so
        # that `limit` counts only what the caller may see.
        readers = set(settings_of(gateway).readers)
        reader = any(readers & set(identity.groups) for identity in who.values())
        filters.readable = {
            name: None if readers & set(identity.groups) else identity.user
            for name, identity in who.items()
            if not filters.connection or name == filters.connection
        }
        scoped_users = set(filters.readable.values())
        if filters.user and None not in scoped_users and filters.user not in scoped_users:
            return json_response({"error": "only auditors may read other users' events"}, 403)
        return filters, sink, reader

    def limit() -> int:
        try:
            return max(1, min(int(request.args.get("limit", "1000")), 10_000))
        except ValueError:
            return 1000

    def scoped(
        handler: Callable[[store.Filters, DatabaseSink, bool], Awaitable[Response]],
    ) -> Callable[[], Awaitable[Response]]:
        """A route that runs with the caller's filters (or answers with `scope`'s refusal)."""

        @functools.wraps(handler)
        async def route() -> Response:
            found = await scope()
            return found if isinstance(found, Response) else await handler(*found)

        return route

    @bp.get("/api/audit/events")
    @scoped
    async def events(filters: store.Filters, sink: DatabaseSink, _reader: bool) -> Response:
        items = await sink.database.run(lambda s: store.search(s, filters, limit()))
        return json_response({"items": items})

    @bp.get("/api/audit/commands")
    @scoped
    async def commands(filters: store.Filters, sink: DatabaseSink, _reader: bool) -> Response:
        items = await sink.database.run(lambda s: store.commands(s, filters, min(limit(), 1000)))
        return json_response({"items": items})

    @bp.get("/api/audit/export")
    @scoped
    async def export(filters: store.Filters, sink: DatabaseSink, _reader: bool) -> Response:
        lines = await sink.database.run(lambda s: list(store.export(s, filters)))
        response = Response("".join(line + "\n" for line in lines), content_type="application/jsonl")
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/api/audit/verify")
    @scoped
    async def verify(_filters: store.Filters, sink: DatabaseSink, reader: bool) -> Response:
        if not reader:
            return json_response({"error": "only auditors may verify the chain"}, 403)
        checked, problem = await sink.database.run(lambda s: store.verify(s, sink.signer))
        head = await sink.database.run(store.head)
        return json_response({"intact": problem is None, "checked": checked, "head": {"seq": head[0],
                              "hash": head[1]}, "problem": None if problem is None else str(problem)})  # fmt: skip

    return bp
