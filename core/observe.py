"""What operators watch: Prometheus metrics (`GET /metrics`), readiness (`GET /readyz`) and logs that carry
the request id (JSON lines with `log_format: json`).

Metrics are process-wide (one registry, as logging is): a gateway reloaded on SIGHUP keeps counting. With
`workers: N` (several processes, core/server.py) the metrics live in prometheus-client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, set before this module is first imported) and `/metrics` on any worker answers
the sum over all of them; collectors that read live in-process state (agent tunnels, third-party plugins')
answer for the worker that serves the scrape, with a `worker` label (its pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .flow import Flow
    from .gateway import Gateway

# prometheus-client chose its value store when it was imported: mmap files shared by the workers, or memory.
MULTIPROCESS: bool = getattr(prometheus_values.ValueClass, "_multiprocess", False)
REGISTRY = CollectorRegistry()
REQUESTS = Counter("kubegate_requests", "Requests through the gateway, by connection, verb, decision and "
                   "status code.", ["connection", "verb", "decision", "code"], registry=REGISTRY)  # fmt: skip
LATENCY = Histogram("kubegate_request_duration_seconds", "Time from the request to its last byte (sessions: "
                    "to their end).", ["connection", "verb"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))  # fmt: skip
# Gauges say how their workers' values combine (ignored in one process): what is open now adds up over the
# live workers; counts since start add up over every worker that ever ran (a restarted one's too); a sink is
# up only while it is up in every worker. Plugins define their own metrics in REGISTRY and update them in
# `kubegate_metrics` before each scrape (approvals: the pending count, read from the database).
OPEN_STREAMS = Gauge("kubegate_open_streams", "Watches and `logs -f` streams open now.", ["connection"],
                     registry=REGISTRY, multiprocess_mode="livesum")  # fmt: skip
OPEN_SESSIONS = Gauge("kubegate_open_sessions", "exec/attach/port-forward sessions open now.",
                      ["connection", "kind"], registry=REGISTRY, multiprocess_mode="livesum")  # fmt: skip
AUDIT_QUEUE = Gauge("kubegate_audit_queue_depth", "Audit events waiting to be written, per sink.", ["sink"],
                    registry=REGISTRY, multiprocess_mode="livesum")  # fmt: skip
AUDIT_DROPPED = Gauge("kubegate_audit_dropped_events", "Audit events a sink dropped (queue full) since start.",
                      ["sink"], registry=REGISTRY, multiprocess_mode="sum")  # fmt: skip
AUDIT_UNRECORDED = Gauge("kubegate_audit_unrecorded_events", "Events of requests without an identity a sink "
                         "counted instead of queueing (it could not write, or its queue was half full) since "
                         "start.", ["sink"], registry=REGISTRY, multiprocess_mode="sum")  # fmt: skip
AUDIT_WRITTEN = Gauge("kubegate_audit_written_events", "Audit events a sink wrote since start.", ["sink"],
                      registry=REGISTRY, multiprocess_mode="sum")  # fmt: skip
AUDIT_DEAD_LETTER = Gauge("kubegate_audit_dead_letter_events", "Audit events a sink's receiver refused since "
                          "start, kept in its dead-letter file (audit-webhook).", ["sink"], registry=REGISTRY,
                          multiprocess_mode="sum")  # fmt: skip
AUDIT_HEALTHY = Gauge("kubegate_audit_sink_up", "1 while a sink writes, 0 while its writes fail.", ["sink"],
                      registry=REGISTRY, multiprocess_mode="livemin")  # fmt: skip
# How often each worker publishes its sinks' gauges (another worker may answer the scrape).
PUBLISH_SECONDS = 1.0


def decision_label(flow: Flow) -> str:
    if flow.auth_failure:
        return "unauthenticated"
    return str(flow.decision.verdict) if flow.decision is not None else "none"


def observe(flow: Flow) -> None:
    """Count a finished request (or session) once."""
    verb = flow.attributes.verb or flow.request.method.lower()
    connection = flow.connection.name
    key = (connection, verb, decision_label(flow), flow.response.status)
    metrics = _REQUEST_METRICS.get(key)
    if metrics is None:
        metrics = _REQUEST_METRICS[key] = (
            REQUESTS.labels(connection, verb, key[2], str(key[3])),
            LATENCY.labels(connection, verb),
        )
    metrics[0].inc()
    metrics[1].observe(flow.latency_ms / 1000)


# Each request's counter and histogram, by their label values: `labels()` checks and locks on every call, half
# of this per-request work. As bounded as prometheus-client's own children (methods outside the API's are
# refused before a flow exists; decisions and status codes are few).
_REQUEST_METRICS: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}


def is_stream(flow: Flow) -> bool:
    attributes = flow.attributes
    # `follow` as the API server reads it (any value but 0/false, e.g. `follow=1`), not a substring.
    return attributes.verb == "watch" or (attributes.subresource == "log" and attributes.follow)


def publish_sink_gauges(gateway: Gateway) -> None:
    """Each audit sink's queue, drops, writes and health, from this process's sinks."""
    for value in list(gateway.extensions.values()):
        if hasattr(value, "queue") and hasattr(value, "dropped") and hasattr(value, "healthy"):
            AUDIT_QUEUE.labels(value.name).set(len(value.queue))
            AUDIT_DROPPED.labels(value.name).set(value.dropped)
            AUDIT_WRITTEN.labels(value.name).set(value.written)
            if hasattr(value, "unrecorded"):
                AUDIT_UNRECORDED.labels(value.name).set(value.unrecorded)
            AUDIT_HEALTHY.labels(value.name).set(1 if value.healthy else 0)
            if hasattr(value, "dead_lettered"):
                AUDIT_DEAD_LETTER.labels(value.name).set(value.dead_lettered)


async def publish_forever(current: Callable[[], Gateway]) -> None:
    """In a worker of several: keep this process's sink gauges fresh for scrapes another worker answers."""
    while True:
        with contextlib.suppress(Exception):  # a sink mid-reload must not end the loop
            publish_sink_gauges(current())
        await asyncio.sleep(PUBLISH_SECONDS)


class _ThisWorker(Collector):
    """The collectors of REGISTRY that read live in-process state (not prometheus-client's metric objects,
    which the multiprocess files already hold), with the serving worker's pid as a `worker` label."""

    def collect(self) -> Iterator[Any]:
        # prometheus-client keeps no public list of a registry's collectors.
        collectors = list(getattr(REGISTRY, "_collector_to_names", {}))
        worker = str(os.getpid())
        for collector in collectors:
            if isinstance(collector, MetricWrapperBase):
                continue
            for family in collector.collect():
                family.samples = [s._replace(labels={**s.labels, "worker": worker}) for s in family.samples]
                yield family


def _exposition() -> bytes:
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client: no annotations
    registry.register(_ThisWorker())
    return generate_latest(registry)


async def metrics_body(gateway: Gateway) -> tuple[bytes, str]:
    """The exposition, with the gauges read from plugins' state just before (`kubegate_metrics`; each audit
    sink's queue)."""
    await gateway.plugins.metrics(gateway)
    publish_sink_gauges(gateway)
    return _exposition(), CONTENT_TYPE_LATEST


class Readiness:
    """`/readyz`: can this replica serve? The database must answer; of the upstreams at least one (a single
    cluster that is down must not take every replica out of a load balancer that fronts several). Results
    are kept for two seconds so probes do not hammer the API servers."""

    TTL = 2.0

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._checked = 0.0
        self._result: tuple[bool, dict[str, Any]] = (False, {})
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, Any]]:
        async with self._lock:
            if time.monotonic() - self._checked > self.TTL:
                self._result = await self._check()
                self._checked = time.monotonic()
            return self._result

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        from sqlalchemy import text

        report: dict[str, Any] = {"database": "ok", "connections": {}}
        try:
            await asyncio.wait_for(self.gateway.database.run(lambda s: s.exec(text("SELECT 1"))), 3)  # type: ignore[call-overload]
        except Exception as exc:
            report["database"] = (
                f"failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        results = await asyncio.gather(*(self._upstream(c) for c in self.gateway.connections))
        for connection, result in zip(self.gateway.connections, results, strict=True):
            report["connections"][connection.name] = result
        upstream_ok = not report["connections"] or any(r == "ok" for r in report["connections"].values())
        return report["database"] == "ok" and upstream_ok and self.gateway.running, report

    @classmethod
    async def _upstream(cls, connection: Any) -> str:
        """ "ok", or why the connection cannot serve: its API server's answer first, then what its plugins
        say (`kubegate_readiness`: the masking plugin that cannot follow the Secrets, a fail-closed audit
        sink that cannot write)."""
        answer = await cls._api_server(connection)
        problems = connection.hooks.readiness(connection)
        if answer != "ok":
            problems.insert(0, answer)
        return "; ".join(problems) or "ok"

    @staticmethod
    async def _api_server(connection: Any) -> str:
        upstream = connection.upstream
        # A connection type that knows better (an agent tunnel: is an agent connected?) answers itself.
        readiness = getattr(upstream, "readiness", None)
        if readiness is not None:
            return str(await readiness())
        try:
            async with asyncio.timeout(3):
                response = await upstream.session.get(f"{upstream.base_url}/readyz",
                                                      headers=upstream.credential_headers(),
                                                      **upstream.request_options)  # fmt: skip
                async with response:
                    await response.read()
                    return "ok" if response.status == 200 else f"API server answered {response.status}"
        except TimeoutError:
            return "no answer within 3 s"
        except Exception as exc:
            return f"unreachable: {exc.__class__.__name__}"


# -- logs -------------------------------------------------------------------------------------------------

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kubegate_request_id", default="")


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being handled (the audit events' `request_id`) on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, with_pid: bool = False):
        super().__init__()
        self.with_pid = with_pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.with_pid:
            entry["pid"] = record.process
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: str, with_pid: bool = False) -> None:
    """`with_pid` (several workers): each line says which process wrote it."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(with_pid))
    else:
        pid = " [%(process)d]" if with_pid else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin it loads
