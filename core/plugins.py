"""The plugin host: a typed facade over pluggy.

Built-in features are plugins registered exactly like third-party ones (from ``DEFAULT_PLUGINS``, then the
``kubegate`` entry-point group). Each call site goes through a method of :class:`GatewayHooks` or
:class:`ConnectionHooks`, so hook calls are type-checked and every async result is awaited.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, cast

import pluggy

from . import hookspecs
from .flow import AuditEvent, AuthFailure, BodyTransformer, Decision, Flow, Frame, Identity, Session, Verdict
from .people import PeopleResolver

if TYPE_CHECKING:
    from pydantic import BaseModel
    from quart import Blueprint
    from sqlmodel import SQLModel

    from kubegate.core.connections import Connection, ConnectionType
    from kubegate.core.gateway import Gateway

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)

ENTRY_POINT_GROUP = "kubegate"

# Built-ins, registered like third-party plugins: a module, or `module:ATTRIBUTE` for a plugin object a
# module makes (the audit sinks share their hooks that way). Each sets PLUGIN_NAME.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "kubegate.connections.kubernetes",
    "kubegate.connections.agent.plugin",
    "kubegate.plugins.static_tokens",
    "kubegate.plugins.oidc",
    "kubegate.plugins.login.plugin",
    "kubegate.plugins.policy",
    "kubegate.plugins.approvals",
    "kubegate.plugins.webhook",
    "kubegate.plugins.masking",
    "kubegate.plugins.recording",
    "kubegate.plugins.mcp",
    "kubegate.plugins.audit.database:PLUGIN",
    "kubegate.plugins.audit.file:PLUGIN",
    "kubegate.plugins.audit.webhook:PLUGIN",
    "kubegate.plugins.audit.stdout:PLUGIN",
    "kubegate.ui.plugin",
)

_DECISION_RANK = {Verdict.ALLOW: 0, Verdict.NEEDS_APPROVAL: 1, Verdict.DENY: 2}


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
# What one implementation of a hook returns: its answer, or an awaitable of it (``async def`` or not).
MaybeAwaitable: TypeAlias = "Awaitable[T] | T"


class HookCall(Protocol[T_co]):
    """A pluggy hook caller, typed: the answers of its implementations, each maybe awaitable. pluggy types
    every answer `Any`; each hook's facade below names what its spec in `hookspecs` returns."""

    def __call__(self, **kwargs: object) -> Sequence[MaybeAwaitable[T_co]]: ...

    def get_hookimpls(self) -> list[pluggy.HookImpl]: ...


class CountingPluginManager(pluggy.PluginManager):
    """pluggy's manager, counting the changes to what is registered so that `HookSnapshot`s know when to look
    again. Every registration goes through `register`/`unregister` (entry points and `set_blocked` too)."""

    generation = 0

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.generation += 1

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation += 1

    def add_hookspecs(self, module_or_class: Any) -> None:
        try:
            super().add_hookspecs(module_or_class)
        finally:
            self.generation += 1


class HookSnapshot:
    """Calls a hook's implementations as pluggy would — last registered first, each given the arguments it
    names, None answers left out, the first answer only for a `firstresult` hook, an implementation's
    exception raised as is — from a list taken once, instead of through pluggy on every call.

    Why: the request path calls about ten hooks per request, and a pluggy call of a connection's subset
    filters the implementations again and checks the arguments every time — about 5 µs a call against
    0.5 µs here (issue 15). The list is taken again when the manager's `generation` moved (a plugin was
    registered or removed). A hook with a wrapper implementation (`hookwrapper`/`wrapper`), or a manager that
    does not count its changes, is called through pluggy, exactly as before."""

    __slots__ = ("_caller", "_firstresult", "_generation", "_impls", "_pm")

    def __init__(self, pm: pluggy.PluginManager, caller: Any):
        self._caller = caller
        self._pm = pm if isinstance(pm, CountingPluginManager) else None
        spec = caller.spec
        self._firstresult = bool(spec is not None and spec.opts.get("firstresult"))
        self._generation = -1  # never a manager's: the first call takes the list
        self._impls: tuple[tuple[Any, tuple[str, ...]], ...] | None = None

    def _take(self, generation: int) -> None:
        impls = self._caller.get_hookimpls()
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            self._impls = None
        else:  # pluggy calls the last of get_hookimpls() first
            self._impls = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(impls))
        self._generation = generation

    def __call__(self, **kwargs: Any) -> Any:
        if self._pm is None:
            return self._caller(**kwargs)
        if self._generation != self._pm.generation:
            self._take(self._pm.generation)
        impls = self._impls
        if impls is None:
            return self._caller(**kwargs)
        if self._firstresult:
            for function, names in impls:
                answer = function(*[kwargs[name] for name in names])
                if answer is not None:
                    return answer
            return None
        results = []
        for function, names in impls:
            answer = function(*[kwargs[name] for name in names])
            if answer is not None:
                results.append(answer)
        return results

    def get_hookimpls(self) -> list[pluggy.HookImpl]:
        return list(self._caller.get_hookimpls())


async def await_me_maybe(value: MaybeAwaitable[T]) -> T:
    """Await `value` when it is awaitable: hooks may be implemented with or without ``async``."""
    if inspect.isawaitable(value):
        return cast(T, await value)
    return cast(T, value)


def _close_pending(results: Iterable[object]) -> None:
    for value in results:
        if inspect.iscoroutine(value):
            value.close()


async def _first_answer(results: Sequence[MaybeAwaitable[T]]) -> T | None:
    """Await implementations in call order (pluggy: last registered first) and stop at the first non-None
    answer; the coroutines not awaited are closed."""
    for index, result in enumerate(results):
        try:
            answer = await await_me_maybe(result)
        except BaseException:
            _close_pending(results[index + 1 :])
            raise
        if answer is not None:
            _close_pending(results[index + 1 :])
            return answer
    return None


# What a command line becomes in records when no plugin can mask it: each argument hidden, never in clear.
UNMASKED_ARGUMENT = "******"
METRICS_SECONDS = 2.0  # per `kubegate_metrics` implementation


class RecordHooks:
    """The gateway-wide record hooks: called on every installed plugin whatever a connection enables (records
    are masked everywhere); one instance per host, shared by its connections."""

    def __init__(self, pm: pluggy.PluginManager):
        self._body = HookSnapshot(pm, pm.hook.kubegate_record_body)
        self._query = HookSnapshot(pm, pm.hook.kubegate_record_query)
        self._command = HookSnapshot(pm, pm.hook.kubegate_record_command)
        self._text = HookSnapshot(pm, pm.hook.kubegate_record_text)
        self._stream = HookSnapshot(pm, pm.hook.kubegate_record_stream)

    def body(self, flow: Flow, body: bytes) -> str | None:
        return cast("str | None", self._body(flow=flow, body=body))

    def query(self, flow: Flow, query: str) -> str:
        rendered = self._query(flow=flow, query=query)
        return query if rendered is None else cast(str, rendered)

    def command(self, flow: Flow, argv: list[str]) -> list[str]:
        """`kubegate_record_command`: the first plugin's rendering; with none, or one that fails, every
        argument hidden (fail closed: a command line may hold a password)."""
        try:
            rendered = self._command(flow=flow, argv=list(argv))
        except Exception:
            log.exception("record_command hook failed; the command line is recorded hidden")
            rendered = None
        return [UNMASKED_ARGUMENT for _ in argv] if rendered is None else list(rendered)

    def text(self, flow: Flow, data: bytes) -> bytes:
        """`kubegate_record_text`: the first plugin's rendering; with none, or one that fails, nothing (text
        that cannot be masked is not stored)."""
        try:
            rendered = self._text(flow=flow, data=data)
        except Exception:
            log.exception("record_text hook failed; the text is not stored")
            rendered = None
        return b"" if rendered is None else bytes(rendered)

    def stream(self, flow: Flow) -> BodyTransformer:
        """`kubegate_record_stream`: the first plugin's stream masker; with none, or one that fails, a
        stream of which nothing is stored."""
        try:
            stream = cast("BodyTransformer | None", self._stream(flow=flow))
        except Exception:
            log.exception("record_stream hook failed; the stream is not stored")
            stream = None
        return GuardedRecordStream(stream)


class GuardedRecordStream:
    """A plugin's record stream masker, failing closed: nothing is stored without one, and nothing more once
    it failed (what it holds is lost with it; what follows could be the rest of a secret it held)."""

    def __init__(self, stream: BodyTransformer | None):
        self.stream = stream

    def feed(self, chunk: bytes) -> bytes:
        return self._call(chunk, end=False)

    def end(self) -> bytes:
        return self._call(b"", end=True)

    def _call(self, chunk: bytes, end: bool) -> bytes:
        if self.stream is None:
            return b""
        try:
            return bytes(self.stream.end() if end else self.stream.feed(chunk))
        except Exception:
            log.exception("record stream failed; the rest of the stream is not stored")
            self.stream = None
            return b""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    origin: str  # "builtin" or "entry point <dist>"
    hooks: tuple[str, ...]


class PluginHost:
    """Owns the pluggy manager and knows which plugins exist."""

    def __init__(self, *, load_entry_points: bool = True, extra: Iterable[ModuleType | object] = ()):
        self.pm = CountingPluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[str, str] = {}
        for entry in DEFAULT_PLUGINS:
            module_name, _, attribute = entry.partition(":")
            module = importlib.import_module(module_name)
            self.register(getattr(module, attribute) if attribute else module, origin="builtin")
        if load_entry_points:
            before = set(self.pm.get_plugins())
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            for plugin in set(self.pm.get_plugins()) - before:
                name = self.pm.get_name(plugin) or repr(plugin)
                dist = dict(self.pm.list_plugin_distinfo()).get(plugin)
                self._origins[name] = f"entry point ({dist.project_name})" if dist else "entry point"
        for plugin in extra:
            self.register(plugin, origin="extra")
        self.pm.check_pending()
        self.records = RecordHooks(self.pm)
        self._audit_fields: tuple[tuple[Any, bool, str], ...] = ()
        self._audit_fields_generation = -1  # never the manager's: the first call takes the list

    def register(self, plugin: ModuleType | object, *, origin: str, name: str | None = None) -> str:
        name = name or getattr(plugin, "PLUGIN_NAME", None) or getattr(plugin, "__name__", None)
        if not name:
            raise ValueError(f"plugin {plugin!r} has no PLUGIN_NAME")
        self.pm.register(plugin, name=name)
        self._origins[name] = origin
        return name

    @property
    def names(self) -> list[str]:
        return sorted(n for n, _ in self.pm.list_name_plugin())

    def plugin(self, name: str) -> object | None:
        return self.pm.get_plugin(name)

    def describe(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in sorted(self.pm.list_name_plugin()):
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            infos.append(PluginInfo(name, module, self._origins.get(name, "?"), hooks))
        return infos

    # -- gateway hooks --------------------------------------------------------------------------------

    def connection_types(self) -> dict[str, ConnectionType]:
        types: dict[str, ConnectionType] = {}
        answers: list[dict[str, ConnectionType] | None] = self.pm.hook.kubegate_connection_types()
        for result in answers:
            for type_name, ctype in (result or {}).items():
                if type_name in types:
                    raise ValueError(f"connection type {type_name!r} is registered twice")
                types[type_name] = ctype
        return types

    def plugin_settings_models(self) -> dict[str, type[BaseModel]]:
        """Per-connection settings model per plugin name (only plugins that declare one)."""
        return self._models(self.pm.hook.kubegate_plugin_settings)

    def gateway_settings_models(self) -> dict[str, type[BaseModel]]:
        """Gateway-wide settings model per plugin name (only plugins that declare one)."""
        return self._models(self.pm.hook.kubegate_gateway_settings)

    @staticmethod
    def _models(hook: Any) -> dict[str, type[BaseModel]]:
        models: dict[str, type[BaseModel]] = {}
        for impl in hook.get_hookimpls():
            model = cast("type[BaseModel] | None", impl.function())
            if model is not None:
                models[impl.plugin_name] = model
        return models

    def http_routes(self, gateway: Gateway) -> list[Blueprint]:
        blueprints: list[Blueprint | None] = self.pm.hook.kubegate_http_routes(gateway=gateway)
        return [bp for bp in blueprints if bp is not None]

    async def startup(self, gateway: Gateway) -> None:
        results: list[MaybeAwaitable[None]] = self.pm.hook.kubegate_startup(gateway=gateway)
        for result in results:
            await await_me_maybe(result)

    async def shutdown(self, gateway: Gateway) -> None:
        results: list[MaybeAwaitable[None]] = self.pm.hook.kubegate_shutdown(gateway=gateway)
        for result in results:
            try:
                await await_me_maybe(result)
            except Exception:
                log.exception("shutdown hook failed")

    def record_body(self, flow: Flow, body: bytes) -> str | None:
        """A request body as people may read it (audit, approvals), from the first plugin that renders it;
        called on every plugin, whatever the connection enables, since records are masked everywhere."""
        return self.records.body(flow, body)

    def record_query(self, flow: Flow, query: str) -> str:
        """A query string as audit records carry it (an exec's command line masked), from the first plugin
        that renders it; as it is when none does. Called on every plugin, like `record_body`."""
        return self.records.query(flow, query)

    def record_command(self, flow: Flow, argv: list[str]) -> list[str]:
        """An exec/attach command line as records keep it; see `RecordHooks.command`."""
        return self.records.command(flow, argv)

    def record_text(self, flow: Flow, data: bytes) -> bytes:
        """Text as it may be stored (a stated reason); see `RecordHooks.text`."""
        return self.records.text(flow, data)

    def record_stream(self, flow: Flow) -> BodyTransformer:
        """A masker for a stream that is stored (recordings); see `RecordHooks.stream`."""
        return self.records.stream(flow)

    def audit_fields(self, flow: Flow) -> dict[str, Any]:
        """The plugins' parts of a request's audit event, in registration order; the first plugin to give a
        key keeps it. A plugin that fails contributes nothing to this event (logged): the event is still
        recorded."""
        fields: dict[str, Any] = {}
        for function, takes_flow, plugin_name in self._audit_field_impls():
            try:
                part = cast("dict[str, Any] | None", function(flow) if takes_flow else function())
            except Exception:
                log.exception("kubegate_audit_fields of %s failed", plugin_name)
                continue
            for key, value in (part or {}).items():
                if key in fields:
                    log.error("kubegate_audit_fields of %s gives %r again; kept the first", plugin_name, key)
                    continue
                fields[key] = value
        return fields

    def _audit_field_impls(self) -> tuple[tuple[Any, bool, str], ...]:
        """The `kubegate_audit_fields` implementations in registration order, taken again only when a plugin
        was registered or removed (called on every audited request)."""
        if self._audit_fields_generation != self.pm.generation:
            self._audit_fields = tuple(
                (impl.function, bool(impl.argnames), impl.plugin_name)
                for impl in self.pm.hook.kubegate_audit_fields.get_hookimpls()
            )
            self._audit_fields_generation = self.pm.generation
        return self._audit_fields

    def database_models(self) -> list[type[SQLModel]]:
        """The table classes every installed plugin stores (importing them declares their tables)."""
        answers: list[Iterable[type[SQLModel]] | None] = self.pm.hook.kubegate_database_models()
        return [model for models in answers for model in models or ()]

    async def metrics(self, gateway: Gateway) -> None:
        """Let plugins bring their gauges up to date before a scrape: two seconds each; a failing or slow one
        leaves its gauges as they were."""
        for impl in self.pm.hook.kubegate_metrics.get_hookimpls():
            try:
                answer = impl.function(*[gateway][: len(impl.argnames)])
                await asyncio.wait_for(await_me_maybe(answer), METRICS_SECONDS)
            except Exception:  # a database that does not answer shows in /readyz, not here
                log.debug("kubegate_metrics of %s failed", impl.plugin_name, exc_info=True)

    def for_connection(self, enabled: Iterable[str], people: PeopleResolver | None = None) -> ConnectionHooks:
        """The hooks of a connection with `enabled` plugins; `people` finds authenticated identities'
        person keys (the config's `people` section; without one, the user name)."""
        return ConnectionHooks(self.pm, frozenset(enabled), people or PeopleResolver(), self.records)


class ConnectionHooks:
    """The hooks of one connection: only its enabled plugins are called. Built once per config load."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        enabled: frozenset[str],
        people: PeopleResolver,
        records: RecordHooks | None = None,
    ):
        self.enabled = enabled
        self.people = people
        self._records = records or RecordHooks(pm)  # the gateway-wide record hooks plugins reach from a flow
        remove = [plugin for name, plugin in pm.list_name_plugin() if name not in enabled]

        def caller(name: str, remove: list[object]) -> Any:
            return HookSnapshot(pm, pm.subset_hook_caller(name, remove))

        # Each typed with what its spec (hookspecs) returns.
        self._authenticate: HookCall[Identity | AuthFailure | None] = caller("kubegate_authenticate", remove)
        self._decide: HookCall[Decision | None] = caller("kubegate_decide", remove)
        self._approval: HookCall[Decision | None] = caller("kubegate_approval", remove)
        self._upstream_request: HookCall[None] = caller("kubegate_upstream_request", remove)
        self._response_headers: HookCall[None] = caller("kubegate_response_headers", remove)
        self._response_stream: HookCall[BodyTransformer | None] = caller("kubegate_response_stream", remove)
        self._session_start: HookCall[None] = caller("kubegate_session_start", remove)
        self._stream_frame: HookCall[None] = caller("kubegate_stream_frame", remove)
        self._session_end: HookCall[None] = caller("kubegate_session_end", remove)
        self._audit_event: HookCall[None] = caller("kubegate_audit_event", remove)
        self._readiness: HookCall[str | None] = caller("kubegate_readiness", remove)
        # Hooks nobody implements on this connection are skipped on the hot path.
        self.has_upstream_request = bool(self._upstream_request.get_hookimpls())
        self.has_response_headers = bool(self._response_headers.get_hookimpls())
        self.has_response_stream = bool(self._response_stream.get_hookimpls())
        self.has_frame_hooks = bool(self._stream_frame.get_hookimpls())
        self.has_session_hooks = bool(
            self._session_start.get_hookimpls() or self._session_end.get_hookimpls()
        )
        self.has_audit = bool(self._audit_event.get_hookimpls())

    def record_body(self, flow: Flow, body: bytes) -> str | None:
        """`PluginHost.record_body` for plugins that hold a flow (records are masked on every connection)."""
        return self._records.body(flow, body)

    def record_query(self, flow: Flow, query: str) -> str:
        """`PluginHost.record_query`, reachable from a flow."""
        return self._records.query(flow, query)

    def record_command(self, flow: Flow, argv: list[str]) -> list[str]:
        """`PluginHost.record_command`, reachable from a flow."""
        return self._records.command(flow, argv)

    def record_text(self, flow: Flow, data: bytes) -> bytes:
        """`PluginHost.record_text`, reachable from a flow."""
        return self._records.text(flow, data)

    def record_stream(self, flow: Flow) -> BodyTransformer:
        """`PluginHost.record_stream`, reachable from a flow."""
        return self._records.stream(flow)

    async def authenticate(self, flow: Flow) -> Identity | AuthFailure | None:
        """The first plugin's answer; an identity comes with its person key resolved here, so the data path
        and the plugins' APIs (which both authenticate through this) always agree on who the person is."""
        answer = await _first_answer(self._authenticate(flow=flow))
        if isinstance(answer, Identity):
            return self.people.resolve(answer)
        return answer

    async def decide(self, flow: Flow) -> Decision | None:
        strictest: Decision | None = None
        for result in self._decide(flow=flow):
            decision = await await_me_maybe(result)
            if decision is None:
                continue
            if strictest is None or _DECISION_RANK[decision.verdict] > _DECISION_RANK[strictest.verdict]:
                strictest = decision
        return strictest

    async def approval(self, flow: Flow, decision: Decision) -> Decision | None:
        return await _first_answer(self._approval(flow=flow, decision=decision))

    async def upstream_request(self, flow: Flow) -> None:
        for result in self._upstream_request(flow=flow):
            await await_me_maybe(result)

    async def response_headers(self, flow: Flow) -> None:
        for result in self._response_headers(flow=flow):
            await await_me_maybe(result)

    async def response_stream(self, flow: Flow) -> list[BodyTransformer]:
        transformers = []
        for result in self._response_stream(flow=flow):
            transformer = await await_me_maybe(result)
            if transformer is not None:
                transformers.append(transformer)
        return transformers

    async def session_start(self, flow: Flow, session: Session) -> None:
        for result in self._session_start(flow=flow, session=session):
            await await_me_maybe(result)

    async def stream_frame(self, flow: Flow, session: Session, frame: Frame) -> None:
        for result in self._stream_frame(flow=flow, session=session, frame=frame):
            await await_me_maybe(result)

    async def session_end(self, flow: Flow, session: Session) -> None:
        for result in self._session_end(flow=flow, session=session):
            await await_me_maybe(result)

    async def audit_event(self, event: AuditEvent, connection: Connection) -> None:
        for result in self._audit_event(event=event, connection=connection):
            await await_me_maybe(result)

    def readiness(self, connection: Connection) -> list[str]:
        """What the connection's plugins have against serving it now (`kubegate_readiness`), one line each;
        a plugin that raises is a problem too (fail closed)."""
        try:
            return [str(answer) for answer in self._readiness(connection=connection) if answer is not None]
        except Exception as exc:
            log.exception("kubegate_readiness failed")
            return [f"a plugin's readiness check failed: {exc.__class__.__name__}"]
