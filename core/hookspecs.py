"""Every kubegate hook, in the order a request meets them. The docstrings are the reference.

Plugins implement hooks with ``@kubegate.core.hookimpl``; a plugin module is one feature. Implementations
may be plain functions or ``async def`` — the host awaits every result, so never rely on ``firstresult``
semantics: where a hook says "the first non-None answer wins", the host awaits implementations in call
order and stops at the first answer.

Scopes:

* **Gateway hooks** (connection types, plugin settings, routes, startup/shutdown) are called on every
  installed plugin.
* **Connection hooks** (everything that receives a ``flow`` or a ``connection``) are called only on the
  plugins enabled on that connection (``connections.NAME.plugins`` in the config). The per-connection
  plugin set is computed once per config load.

Failure rule: an exception in ``kubegate_authenticate`` or ``kubegate_decide`` denies the request
(fail closed); an exception in a transformer ends that response.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from pydantic import BaseModel
    from quart import Blueprint
    from sqlmodel import SQLModel

    from kubegate.core.connections import Connection, ConnectionType
    from kubegate.core.flow import (
        AuditEvent,
        AuthFailure,
        BodyTransformer,
        Decision,
        Flow,
        Frame,
        Identity,
        Session,
    )
    from kubegate.core.gateway import Gateway

PROJECT = "kubegate"
hookspec = pluggy.HookspecMarker(PROJECT)

# ---------------------------------------------------------------------------------------------------------
# Gateway: configuration, start and stop
# ---------------------------------------------------------------------------------------------------------


@hookspec
def kubegate_connection_types() -> dict[str, ConnectionType]:
    """Register connection types by name (``type:`` of a connection in the config).

    :return: a mapping of type name to a :class:`~kubegate.core.connections.ConnectionType`.
        The built-in ``kubernetes`` type is registered through this hook like any other.
    """


@hookspec
def kubegate_plugin_settings() -> type[BaseModel] | None:
    """Declare the pydantic model that validates this plugin's per-connection settings.

    The host validates ``connections.NAME.plugins.PLUGIN`` against it when the config loads, and reports
    a bad value with the file, the key and the reason. The validated instance is then available as
    ``flow.connection.settings_for(PLUGIN)``. Return None (or don't implement) for a plugin without
    settings.
    """


@hookspec
def kubegate_gateway_settings() -> type[BaseModel] | None:
    """Declare the pydantic model of this plugin's gateway-wide settings (top-level ``plugins.PLUGIN``).

    For plugins that serve the gateway as a whole rather than one connection, such as the browser login.
    The host validates the block when the config loads (a plugin listed there without this hook is an
    error) and makes the instance available as ``gateway.settings_for(PLUGIN)``, None when the plugin is
    not listed. Such a plugin may implement ``kubegate_plugin_settings`` too, for its per-connection part.
    """


@hookspec
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    """Return a Quart blueprint of extra HTTP routes served by the gateway (outside ``/k8s/``).

    :param gateway: the running gateway (config, connections, hooks).
    """


@hookspec
def kubegate_startup(gateway: Gateway) -> Awaitable[None] | None:
    """Called once when the gateway starts serving, after the config and connections are loaded.

    :param gateway: the running gateway.
    """


@hookspec
def kubegate_shutdown(gateway: Gateway) -> Awaitable[None] | None:
    """Called once when the gateway stops, before upstream sessions close.

    :param gateway: the running gateway.
    """


@hookspec
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this plugin's commands to ``kubegate`` (``subparsers.add_parser(...)``, ``set_defaults(func=...)``).

    Called on the command-line host, not on the gateway's plugin host: the built-in command modules and
    the plugins of the ``kubegate`` entry-point group. Every ``kubegate`` run builds the whole parser (kubectl
    runs ``kubegate credential`` before each request), so the module that implements this hook imports only
    light modules (``argparse``, ``kubegate.core.cli``) and each handler imports what it needs when it runs.
    A handler takes the parsed arguments and returns the exit code; it reports a user's mistake by raising
    ``kubegate.core.cli.CLIError`` (one line, exit 2). A command name taken twice stops the command line.

    :param subparsers: the ``kubegate`` parser's subcommands.
    """


@hookspec
def kubegate_database_models() -> Iterable[type[SQLModel]] | None:
    """Return the ``SQLModel`` table classes this plugin stores (tables named ``kubegate_*``).

    A gateway hook, called before the schema is created or migrated (at start, ``kubegate db upgrade``,
    alembic's environment), so every table exists whatever the connections enable. The built-in plugins'
    tables are versioned by the migrations in ``core/migrations``; a third-party plugin's tables are created
    when missing, never altered.
    """


@hookspec
def kubegate_metrics(gateway: Gateway) -> Awaitable[None] | None:
    """Bring this plugin's Prometheus gauges up to date just before ``GET /metrics`` answers.

    A gateway hook. Define metrics at module level in ``kubegate.core.observe.REGISTRY`` (with a
    ``multiprocess_mode`` for gauges: several workers may serve); read what they show here (a count from
    the database, the size of a queue). Each implementation gets two seconds; one that fails or takes longer
    leaves its gauges as they were, and the scrape is answered anyway.

    :param gateway: the running gateway.
    """


@hookspec
def kubegate_readiness(connection: Connection) -> str | None:
    """Say why this plugin cannot serve ``connection`` now, in one line; None when it can.

    A connection hook, called for each connection when ``GET /readyz`` checks (at most every two seconds),
    on the plugins the connection enables. A connection with a problem counts as not ready, as one whose
    API server does not answer; the replica is ready while any connection is. Answer from state the plugin
    keeps (no network call here): the masking plugin, while it cannot follow the cluster's Secrets; an
    audit sink that fails closed, while it cannot write. A plugin that raises counts as a problem.

    :param connection: the connection checked.
    """


# ---------------------------------------------------------------------------------------------------------
# Request: who is calling, and may they?
# ---------------------------------------------------------------------------------------------------------


@hookspec
def kubegate_authenticate(
    flow: Flow,
) -> Identity | AuthFailure | Awaitable[Identity | AuthFailure | None] | None:
    """Establish who sent the request.

    Tri-state, asked in call order until one answers: return None when the credential is not this
    plugin's to judge (no token, a token of another kind), an :class:`~kubegate.core.flow.Identity` to
    accept it, or an :class:`~kubegate.core.flow.AuthFailure` to reject it. The first non-None answer wins.
    When no plugin answers, or one raises, the request gets a 401 ``Status`` and never reaches upstream.

    :param flow: the request; ``flow.request.headers`` holds the caller's ``Authorization`` header.
    """


@hookspec
def kubegate_decide(flow: Flow) -> Decision | Awaitable[Decision | None] | None:
    """Decide whether the authenticated request may go on: allow, deny, or needs approval.

    Every enabled plugin is asked; the strictest answer wins (deny, then needs approval, then allow).
    None means no opinion; when nobody has one, the request is allowed (cluster RBAC still applies,
    because the API server sees the caller through impersonation). A "needs approval" answer that is still
    the strictest when all plugins have answered goes to ``kubegate_approval``; say who may approve in
    ``Decision.approval``. A plugin that needs the body awaits ``flow.request.read_body()``. Called for REST
    requests and before a WebSocket upgrade is relayed.

    :param flow: the request, with ``flow.identity`` and ``flow.attributes`` set.
    """


@hookspec
def kubegate_approval(flow: Flow, decision: Decision) -> Decision | Awaitable[Decision | None] | None:
    """Resolve a decision that needs approval: hold the request until it is approved, denied or expires.

    Called when the combined ``kubegate_decide`` answer is ``needs_approval``; the first non-None answer
    wins. Return :meth:`Decision.allow` to let the request through (it then goes upstream as if never
    held), or a deny decision whose reason the client sees as a 403 ``Status``. ``decision.approval``
    says who may approve and what an approval grants. No answer (no approval plugin enabled) → 403.

    The hold happens before anything is sent upstream and, for exec/attach/port-forward, before the
    WebSocket upgrade is answered.

    :param flow: the held request (identity, attributes; the body is readable with
        ``await flow.request.read_body()`` for REST requests).
    :param decision: the strictest decision, with ``approval`` set by the policy.
    """


# ---------------------------------------------------------------------------------------------------------
# Upstream request and response
# ---------------------------------------------------------------------------------------------------------


@hookspec
def kubegate_upstream_request(flow: Flow) -> Awaitable[None] | None:
    """Adjust the request about to be sent to the API server.

    ``flow.upstream_headers`` already has the connection's credential and the impersonation headers; a
    plugin may add headers. Whatever it does, the host checks afterwards that no client ``Authorization``
    or client ``Impersonate-*`` header survived, and refuses the request with a 500 ``Status`` otherwise.
    A plugin that cannot serve the request as asked refuses it by raising ``StatusError`` (the masking
    plugin answers 406 to an ``Accept`` it cannot mask): the client gets that ``Status``, nothing is sent.

    :param flow: the request about to be sent.
    """


@hookspec
def kubegate_response_headers(flow: Flow) -> Awaitable[None] | None:
    """Inspect or edit the response status and headers (``flow.response``) before they go to the client.

    :param flow: the request, with ``flow.response.status`` and ``flow.response.headers`` from upstream.
    """


@hookspec
def kubegate_response_stream(flow: Flow) -> BodyTransformer | Awaitable[BodyTransformer | None] | None:
    """Return a transformer for the response body, or None to leave it untouched.

    Called once per response, after ``kubegate_response_headers``. Transformers are chained in call order;
    each sees chunks as they stream (a watch or ``logs -f`` never ends) and must carry state for data split
    across chunks. When a transformer may change the length, the host drops ``Content-Length``.

    :param flow: the request, with the response headers known.
    """


# ---------------------------------------------------------------------------------------------------------
# exec / attach / port-forward sessions
# ---------------------------------------------------------------------------------------------------------


@hookspec
def kubegate_session_start(flow: Flow, session: Session) -> Awaitable[None] | None:
    """A WebSocket session (exec, attach, port-forward) was accepted by upstream and the client.

    :param flow: the upgrade request.
    :param session: the session (subprotocol, counters).
    """


@hookspec
def kubegate_stream_frame(flow: Flow, session: Session, frame: Frame) -> Awaitable[None] | None:
    """Inspect or rewrite one WebSocket message of a session, in either direction.

    Set ``frame.data`` to rewrite it or ``frame.drop = True`` to swallow it. Called only on connections
    where some enabled plugin implements it; otherwise frames are relayed without this call.

    Holding output back (upstream to client): keep bytes in ``session.state[PLUGIN]``, set
    ``session.flush_after`` (seconds); when no frame came from upstream for that long, and once more when
    upstream closes, the hook gets a frame with ``frame.flush`` set and empty ``data``, to fill with what
    it holds (channel byte first). ``frame.before`` lists whole frames to send ahead of this one (held
    stdout ahead of an exit status, say); they go out as the same kind of message as the frame (text on the
    base64 channel protocols). On a ``flush`` frame, set ``frame.text`` when what it carries is text.

    :param flow: the upgrade request.
    :param session: the session.
    :param frame: the message, with its direction.
    """


@hookspec
def kubegate_session_end(flow: Flow, session: Session) -> Awaitable[None] | None:
    """A WebSocket session ended (either side closed, or an error).

    :param flow: the upgrade request.
    :param session: the session, with ``ended``, byte counters and ``close_code`` set.
    """


# ---------------------------------------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kubegate_record_body(flow: Flow, body: bytes) -> str | None:
    """Render a request body for records people read — audit events, approval requests — masked.

    A gateway hook: called on every installed plugin whatever the connection enables, because records are
    masked everywhere. A plain function (it runs on the request path; no I/O); the first non-None answer
    wins. With no answer (or a failing plugin), records carry only the body's size and SHA-256: a body is
    never recorded as it came. The built-in `masking` plugin answers with the body as JSON, its secrets
    masked (Kubernetes protobuf bodies decoded first), or a size-and-hash note when it cannot parse it.

    :param flow: the request (its connection's masking settings apply when it has any).
    :param body: the whole body (audit offers those up to ``limits.audit_body_bytes``; approvals
        every body they hold, and show reviewers the rendering whole).
    """


@hookspec(firstresult=True)
def kubegate_record_query(flow: Flow, query: str) -> str | None:
    """Render a request's query string for records — audit events — with secrets in it masked (an exec's
    `command` parameters: `mysql -pHUNTER2`, `env DB_PASSWORD=…`; a proxied `?token=…`).

    A gateway hook: called on every installed plugin whatever the connection enables, because records are
    masked everywhere. A plain function (no I/O); the first non-None answer wins, and with no answer the
    query is recorded as it is. If a plugin fails, the record carries no query at all. The built-in
    `masking` plugin answers with the `command` parameters masked as command lines and the other parameters
    by its text rules (the unchanged ones byte for byte) when any needed masking.

    :param flow: the request (its connection's masking settings apply when it has any).
    :param query: the query string as the audit event would carry it (without the `?`).
    """


@hookspec(firstresult=True)
def kubegate_record_command(flow: Flow, argv: list[str]) -> list[str] | None:
    """Render an exec/attach command line for records people read — approval requests, session rows,
    recording titles — with secrets in it masked (``mysql -pHUNTER2``, ``env DB_PASSWORD=…``).

    A gateway hook like ``kubegate_record_body``: called on every installed plugin, a plain function, the
    first non-None answer wins. With no answer (or a failing plugin), records carry every argument replaced
    by ``******``: a command line is never recorded as it came. The built-in `masking` plugin answers with
    each argument masked by the connection's text rules, secret-named variables and flags, and clients'
    password options (its default rules where the connection does not mask).

    :param flow: the request (its connection's masking settings apply when it has any).
    :param argv: the command line, one argument per item.
    """


@hookspec(firstresult=True)
def kubegate_record_text(flow: Flow, data: bytes) -> bytes | None:
    """Mask a text that is stored whole — a caller's stated reason (``Kubegate-Intent``) in approvals and
    audit events, an agent's text in MCP audit records.

    A gateway hook like ``kubegate_record_body``: called on every installed plugin, a plain function, the
    first non-None answer wins. With no answer (or a failing plugin) the text is not stored. The built-in
    `masking` plugin answers with the known values and patterns masked by the connection's masking, or its
    default rules where the connection has none.

    :param flow: the request the text came with.
    :param data: the bytes to store.
    """


@hookspec(firstresult=True)
def kubegate_record_stream(flow: Flow) -> BodyTransformer | None:
    """A masker for one stream that is stored as it runs — a session recording's typed input, or a channel
    of output no plugin masked on its way to the client (see ``flow.output_masked``).

    A gateway hook like ``kubegate_record_body``: called on every installed plugin, a plain function, the
    first non-None answer wins; the recorder asks for one per stream. ``feed`` gets the stream's bytes as
    they come (cut anywhere: a keystroke, a frame) and returns what may be stored now, masked; it holds
    back what could still become part of a secret, so that a secret is masked wherever the stream is cut.
    ``end`` returns what is held, masked, with a secret still in progress hidden. With no answer (or a
    failing plugin, from its failure on) nothing of the stream is stored. The built-in `masking` plugin
    answers with a stream masker of the connection's masking, or its default rules where the connection
    has none.

    :param flow: the session's upgrade request.
    """


@hookspec
def kubegate_audit_fields(flow: Flow) -> dict[str, Any] | None:
    """Contribute this plugin's part of a request's audit event: a mapping of top-level keys to
    JSON-serialisable values (the `policy` plugin's ``policy``, `approvals`' ``approval``, `masking`'s
    ``masking``).

    A gateway hook, called on every installed plugin for every audit event — a plugin not enabled on the
    flow's connection answers too (with None values), so an event has the same keys on every connection. A
    plain function (it runs once per request; no I/O). Keys appear in the order the plugins were
    registered, after ``decision``; a key that core writes itself (``status``, ``identity``, …) or another
    plugin already gave is an error in the plugin, and the event keeps the first value. A plugin that
    raises contributes nothing to that event (logged); the event is still recorded.

    :param flow: the finished request or session.
    """


@hookspec
def kubegate_audit_event(event: AuditEvent, connection: Connection) -> Awaitable[None] | None:
    """Receive an audit event: one per finished request (including denials and authentication failures,
    which carry a token fingerprint, never the token), and one per session start and end.

    :param event: the event; ``event.data`` is JSON-serialisable.
    :param connection: the connection it happened on; ``connection.settings_for(PLUGIN)`` gives a sink
        its settings there.
    """


def all_hook_names() -> list[str]:
    """Names of every hook spec in the order a request meets them (definition order)."""
    return [name for name, value in globals().items() if name.startswith("kubegate_") and callable(value)]
