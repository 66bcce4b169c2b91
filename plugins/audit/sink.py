"""What every audit sink shares: a bounded queue, a writer task that writes batches, health, fail mode.

A request never waits for a fail-open sink. A fail-closed sink makes the request that produced an event
wait until the event is written (after its response went out: the client is not slowed), and while the
sink cannot write, or its queue is full, new requests are refused with 503 (`gate`). Events are never
dropped by a failed write: a failed batch is retried, in order, with backoff up to one second.

Nothing waits on a sink that cannot write: a failed write fails the future of every queued event (the
events stay queued), and a submit while the sink fails queues its event without a future. The queue is
bounded by events (`queue_max`) and by their estimated size (`queue_max_bytes`); past either, the oldest
event not being written is dropped, loudly, and its future failed. The events of requests without an
identity (401s and requests refused before authentication, which anyone can send) are not queued while the
sink fails or its queue is half full: they are counted per connection and source address, and that summary
is written as one `unrecorded` event once the sink writes again (docs/audit.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.errors import ConfigError, StatusError
from kubegate.core.flow import AuditEvent, Decision, Flow
from kubegate.core.plugins import hookimpl

from . import chain

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

log = logging.getLogger("kubegate.audit")


class SigningSettings(BaseModel):
    """For the sinks that keep a hash chain (audit-db, audit-file)."""

    model_config = ConfigDict(extra="forbid")

    signing_algorithm: Literal["hmac-sha256", "ed25519"] | None = Field(
        None, description="Sign every chain hash with a key kept outside the store."
    )
    signing_key_file: Path | None = Field(
        None, description="The key: a secret of ≥16 bytes (HMAC) or an Ed25519 PEM private key."
    )

    def signer(self, base_dir: Path) -> chain.Signer | None:
        if self.signing_algorithm is None:
            return None
        if self.signing_key_file is None:
            raise ValueError("signing_algorithm needs signing_key_file")
        path = (
            self.signing_key_file if self.signing_key_file.is_absolute() else base_dir / self.signing_key_file
        )
        return chain.Signer.from_file(self.signing_algorithm, path)


class SinkSettings(BaseModel):
    """Settings every sink has."""

    model_config = ConfigDict(extra="forbid")

    on_failure: Literal["open", "closed"] = Field(
        "open",
        description="`closed`: while the sink cannot write, requests get 503 and each event is written "
        "before its request finishes; `open`: requests go on (events wait in the queue).",
    )
    batch_max: int = Field(500, ge=1, le=100_000, description="Most events written in one batch.")
    queue_max: int = Field(100_000, ge=1, le=10_000_000, description="Events waiting at most.")
    queue_max_bytes: int = Field(
        64 << 20,
        ge=1 << 20,
        le=1 << 40,
        description="Estimated size of the events waiting, at most (their text, plus a fixed overhead each).",
    )
    # 50 ms, not 10 (issue 15): a transaction costs far more than an event (audit-db on SQLite: about 1.5-2 ms
    # of CPU per transaction against about 0.1 ms per event), and at a thousand requests a second 10 ms made
    # batches of about ten. A fail-closed request waits at most this much longer, after its response went out.
    linger_ms: float = Field(
        50, ge=0, le=1000, description="How long the writer waits for more events before writing a batch."
    )


class SinkFailure(RuntimeError):
    """A failed write whose message already says what failed, in one line (shown as is)."""


def make_record(event: AuditEvent) -> dict[str, Any]:
    """The stored form of an event, before the store adds its chain position (`seq`): the same in every sink,
    with caller-chosen text cut to `FIELD_MAX_CHARS` (`bounded`)."""
    return {
        "id": event.id,
        "time": event.time,
        "kind": event.kind,
        "connection": event.connection,
        "request_id": event.flow_id,
        "data": bounded(event.data),
    }


# Text a caller chooses freely, before any authentication (a 401 is recorded with its path, query and
# User-Agent): a request head may be 1 MiB, and one such event was megabytes of JSON, which a webhook receiver
# refused (413) and which stopped delivery for everyone. Bodies are bounded by `limits.audit_body_bytes`, a
# stated intent by its own limit; identities come from verified credentials.
FIELD_MAX_CHARS = 4096
CALLER_TEXT = ("path", "query", "raw_query", "user_agent", "kubectl_command", "kubectl_session", "source",
               "error", "auth_failure")  # fmt: skip
CALLER_TEXT_WITHIN = {"attributes": None, "decision": ("reason",)}  # None: every string in it


def bounded(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each caller-chosen text longer than `FIELD_MAX_CHARS` cut to that many characters; for each
    field cut, `data.truncated[NAME]` keeps its length in characters and the SHA-256 of its UTF-8 (NAME is
    `user_agent`, or `attributes.name` within). `data` itself is not changed (other hooks read the event).
    Runs for every audited request: the common case (nothing long) is a few lookups, no copy."""
    long = [key for key in CALLER_TEXT if _too_long(data.get(key))]
    within = {
        key: [name for name, item in inner.items() if _too_long(item) and (names is None or name in names)]
        for key, names in CALLER_TEXT_WITHIN.items()
        if isinstance(inner := data.get(key), dict)
    }
    if not long and not any(within.values()):
        return data
    cuts: dict[str, dict[str, Any]] = {}
    changed: dict[str, Any] = {key: _cut(cuts, key, data[key]) for key in long}
    for key, names in within.items():
        if names:
            changed[key] = {
                **data[key],
                **{name: _cut(cuts, f"{key}.{name}", data[key][name]) for name in names},
            }
    return {**data, **changed, "truncated": cuts}


def _too_long(value: Any) -> bool:
    return value.__class__ is str and len(value) > FIELD_MAX_CHARS


def _cut(cuts: dict[str, dict[str, Any]], name: str, value: str) -> str:
    cuts[name] = {
        "length": len(value),
        "sha256": hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    return value[:FIELD_MAX_CHARS]


# What an event costs in memory beyond its text (the dicts, the tuple in the queue): an estimate, as the size
# is; what matters is that an event of long text counts as long.
EVENT_OVERHEAD_BYTES = 512
# What a request waiting for its event (fail-closed) holds: its task, flow and headers (tens of KB measured).
# Counted in the queue's size while it waits, so that `queue_max_bytes` bounds the requests held too.
WAITING_REQUEST_BYTES = 32 << 10
# Sources kept per connection in the summary of unrecorded events; the others are counted together.
UNRECORDED_SOURCES_MAX = 1000
UNRECORDED_SOURCE_CHARS = 256


def record_size(data: dict[str, Any]) -> int:
    """A record's size in bytes as JSON (orjson: about 1.7 µs for a request's record, on the event loop of
    every audited request), or `estimated_size` for data orjson refuses (a lone surrogate)."""
    try:
        return len(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
    except (TypeError, orjson.JSONEncodeError):
        return estimated_size(data)


def estimated_size(value: Any) -> int:
    """An estimate of a record's size in bytes: the length of its text (keys included), 8 per other value.
    Records are the JSON-like data of `make_record`, with caller text already cut. (A walk in Python: about
    7 µs for a request's record, four times orjson's serialization, so `record_size` tries that first.)"""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(key) + estimated_size(item) for key, item in value.items() if isinstance(key, str))
    if isinstance(value, list | tuple):
        return sum(estimated_size(item) for item in value)
    return 8


def unauthenticated(event: AuditEvent) -> bool:
    """A request event without an identity: a 401, or a request refused before authentication."""
    return event.kind == "request" and event.data.get("identity") is None


class SinkWriter:
    """Subclasses implement `write(batch)` (may block: it runs in a thread) and may override `start`."""

    name = "sink"

    def __init__(self, settings: SinkSettings):
        self.settings = settings
        # (record, future of the request waiting for it or None, estimated size)
        self.queue: collections.deque[tuple[dict[str, Any], asyncio.Future[None] | None, int]] = (
            collections.deque()
        )
        self.queued_bytes = 0
        self.healthy = True
        self.last_error = ""
        self.written = 0
        self.dropped = 0
        # Events of requests without an identity not queued (the sink failed or its queue was half full):
        # counted per connection and source until written as `unrecorded` events.
        self.unrecorded = 0
        self._unrecorded: dict[str, dict[str, int]] = {}
        self._unrecorded_since = 0.0
        # How many events at the head of the queue the writer is writing now: never dropped meanwhile (the
        # writer removes its batch from the head when the write succeeds).
        self._in_flight = 0
        # Set while the batch at the head of the queue has failed before: a failure may hide a write that
        # did happen (lost after the commit), which a sink that can tell skips (audit-db: by event id).
        self.retrying = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._deadline = 0.0

    @property
    def fail_closed(self) -> bool:
        return self.settings.on_failure == "closed"

    def write(self, batch: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"audit sink {self.name}")

    def problem(self) -> str | None:
        """What an operator must clear although the sink writes (audit-webhook: events its receiver refused,
        kept aside); None: nothing."""
        return None

    @property
    def full(self) -> bool:
        return (
            len(self.queue) >= self.settings.queue_max or self.queued_bytes >= self.settings.queue_max_bytes
        )

    @property
    def half_full(self) -> bool:
        return (
            len(self.queue) * 2 >= self.settings.queue_max
            or self.queued_bytes * 2 >= self.settings.queue_max_bytes
        )

    async def submit(self, event: AuditEvent) -> None:
        if unauthenticated(event) and (not self.healthy or self.half_full):
            # Anyone can send these, as fast as the gateway answers: while the sink cannot keep them, they
            # must neither hold memory nor push out the events of requests that were let through.
            self._count_unrecorded(event)
            return
        record = make_record(event)
        size = EVENT_OVERHEAD_BYTES + record_size(record["data"])
        future: asyncio.Future[None] | None = None
        if self.fail_closed and self.healthy:
            future = asyncio.get_running_loop().create_future()
            size += WAITING_REQUEST_BYTES
        self._make_room(size)
        self.queue.append((record, future, size))
        self.queued_bytes += size
        self._wakeup.set()
        if future is not None:
            # Resolved when written, or failed at the first failed write or when the queue drops the event
            # (a failed event stays queued for retry).
            with contextlib.suppress(Exception):
                await future

    def _make_room(self, size: int) -> None:
        """Drop the oldest events not being written until one of `size` fits (one past the bounds is kept
        when only the batch being written is left)."""
        dropped = 0
        while self._in_flight < len(self.queue) and (
            len(self.queue) >= self.settings.queue_max
            or self.queued_bytes + size > self.settings.queue_max_bytes
        ):
            _, future, record_size = self.queue[self._in_flight]
            del self.queue[self._in_flight]
            self.queued_bytes -= record_size
            dropped += 1
            if future is not None and not future.done():
                future.set_exception(RuntimeError("audit queue full: the event was dropped"))
        if dropped:
            self.dropped += dropped
            # Logged at the first drop and then at every 1,000th: under a flood, a line per event would
            # flood the log as well.
            if self.dropped == dropped or self.dropped // 1000 != (self.dropped - dropped) // 1000:
                log.error(
                    "audit sink %s: queue full (%d events, about %d bytes), dropped the oldest (%d since start)",
                    self.name, len(self.queue), self.queued_bytes, self.dropped,
                )  # fmt: skip

    def _count_unrecorded(self, event: AuditEvent) -> None:
        if not self._unrecorded:
            self._unrecorded_since = event.time
        self.unrecorded += 1
        sources = self._unrecorded.setdefault(event.connection, {})
        source = str(event.data.get("source") or "")[:UNRECORDED_SOURCE_CHARS]
        if source not in sources and len(sources) >= UNRECORDED_SOURCES_MAX:
            source = "other"
        sources[source] = sources.get(source, 0) + 1
        if self.unrecorded == 1 or self.unrecorded % 10_000 == 0:
            log.error(
                "audit sink %s: %s, the events of requests without an identity are counted, not queued "
                "(%d since start)",
                self.name, "cannot write" if not self.healthy else "queue half full", self.unrecorded,
            )  # fmt: skip

    def _queue_unrecorded_summary(self) -> None:
        """Queue what was counted instead of recorded, one `unrecorded` event per connection."""
        summary, self._unrecorded = self._unrecorded, {}
        for connection, sources in summary.items():
            data = {
                "reason": "the sink could not write or its queue was half full: requests without an "
                "identity were counted per source address, not recorded one by one",
                "since": self._unrecorded_since,
                "requests": sum(sources.values()),
                "sources": sources,
            }
            event = AuditEvent(
                kind="unrecorded", flow_id="", connection=connection, time=time.time(), data=data
            )
            record = make_record(event)
            size = EVENT_OVERHEAD_BYTES + record_size(data)
            self._make_room(size)
            self.queue.append((record, None, size))
            self.queued_bytes += size

    def _fail_waiting(self) -> None:
        """Fail the future of every queued event: their requests end (their events stay queued, without
        the size of a waiting request)."""
        if not any(future is not None for _, future, _ in self.queue):
            return
        kept: collections.deque[tuple[dict[str, Any], asyncio.Future[None] | None, int]] = collections.deque()
        for record, future, size in self.queue:
            if future is not None:
                if not future.done():
                    future.set_exception(RuntimeError(self.last_error))
                size -= WAITING_REQUEST_BYTES
            kept.append((record, None, size))
        self.queue = kept
        self.queued_bytes = sum(size for _, _, size in kept)

    def gate(self) -> None:
        """Refuse new requests while a fail-closed sink cannot write or its queue is full."""
        if not self.fail_closed:
            return
        if not self.healthy:
            raise StatusError(
                503,
                f"the audit store ({self.name}) cannot record requests: {self.last_error}; requests are "
                "refused until it can",
            )
        if self.full:
            raise StatusError(
                503,
                f"the audit store ({self.name}) has {len(self.queue)} events waiting to be written; requests "
                "are refused until it catches up",
            )

    @property
    def batch_bytes_max(self) -> int:
        """Estimated size of a batch at most (but one event): half the queue's, since the batch being written
        cannot be dropped to make room. A sink that stores batches whole in a bounded space lowers it."""
        return self.settings.queue_max_bytes // 2

    def _next_batch(self) -> list[dict[str, Any]]:
        """The records at the head of the queue: at most `batch_max` and `batch_bytes_max` (but one)."""
        batch: list[dict[str, Any]] = []
        size, size_max = 0, self.batch_bytes_max
        for record, _, record_size in self.queue:
            if len(batch) >= self.settings.batch_max or (batch and size + record_size > size_max):
                break
            batch.append(record)
            size += record_size
        return batch

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self.queue) < self.settings.batch_max and self.settings.linger_ms and not self._closing:
                # A transaction per event costs far more than the event: let a few arrive first.
                await asyncio.sleep(self.settings.linger_ms / 1000)
            batch = self._next_batch()
            self._in_flight = len(batch)
            try:
                await asyncio.to_thread(self.write, batch)
            except Exception as exc:
                self._in_flight = 0
                first_failure = self.healthy
                self.healthy = False
                self.last_error = (
                    str(exc).splitlines()[0]
                    if isinstance(exc, SinkFailure) and str(exc)
                    else f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                self.retrying = True
                if first_failure:
                    log.error("audit sink %s cannot write: %s", self.name, self.last_error)
                self._fail_waiting()
                if self._closing and time.monotonic() > self._deadline:
                    log.error("audit sink %s: %d events not written at shutdown", self.name, len(self.queue))
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff, self.retrying = 0.1, False
            if not self.healthy:
                log.warning("audit sink %s writes again", self.name)
            self.healthy, self.last_error = True, ""
            self.written += len(batch)
            for _ in batch:
                _, future, size = self.queue.popleft()
                self.queued_bytes -= size
                if future is not None and not future.done():
                    future.set_result(None)
            self._in_flight = 0
            if self._unrecorded and not self.half_full:
                self._queue_unrecorded_summary()

    async def close(self, drain_seconds: float = 10.0) -> None:
        """Write what is queued (for up to `drain_seconds` while the sink fails), then stop."""
        self._closing = True
        self._deadline = time.monotonic() + drain_seconds
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, drain_seconds + 5)
            except TimeoutError:
                self._task.cancel()
        if self._unrecorded:  # the sink never wrote again: the log is all that is left of them
            log.error(
                "audit sink %s: stopped with requests without an identity counted, not recorded: %s",
                self.name, {connection: sum(sources.values()) for connection, sources in self._unrecorded.items()},
            )  # fmt: skip


class SinkPlugin:
    """The hooks every sink plugin has, around one `SinkWriter` per gateway: made at start when a connection
    enables the plugin (`make(gateway, settings or None)`; a ValueError or OSError stops the start with one
    line), fed every audit event of those connections, asked before each request whether it can write (a
    fail-closed sink refuses with 503), closed at shutdown. A sink module makes one and registers it
    (`DEFAULT_PLUGINS` entry `module:PLUGIN`)."""

    def __init__(self, name: str, module: str, settings_model: type[BaseModel],
                 make: Callable[[Gateway, Any], SinkWriter]):  # fmt: skip
        self.PLUGIN_NAME = name
        self.__name__ = module  # what `kubegate plugins` shows as the plugin's module
        self.settings_model, self.make = settings_model, make

    def sink_of(self, connection: Connection) -> SinkWriter | None:
        sink = connection.state.get(self.PLUGIN_NAME)
        return sink if isinstance(sink, SinkWriter) else None

    @hookimpl
    def kubegate_gateway_settings(self) -> type[BaseModel]:
        return self.settings_model

    @hookimpl
    def kubegate_startup(self, gateway: Gateway) -> None:
        name = self.PLUGIN_NAME
        if not any(name in c.enabled_plugins for c in gateway.connections):
            return
        found = gateway.settings_for(name)
        try:
            sink = self.make(gateway, found if isinstance(found, self.settings_model) else None)
        except (ValueError, OSError) as exc:  # the user's to fix (a key file, the database): one line
            raise ConfigError(gateway.config_path, f"plugins.{name}", str(exc)) from None
        sink.start()
        gateway.extensions[name] = sink
        for connection in gateway.connections:
            if name in connection.enabled_plugins:
                connection.state[name] = sink

    @hookimpl
    async def kubegate_shutdown(self, gateway: Gateway) -> None:
        sink = gateway.extensions.get(self.PLUGIN_NAME)
        if isinstance(sink, SinkWriter):
            await sink.close()

    @hookimpl
    def kubegate_decide(self, flow: Flow) -> Decision | None:
        sink = self.sink_of(flow.connection)
        if sink is not None:
            sink.gate()
        return None

    @hookimpl
    def kubegate_readiness(self, connection: Connection) -> str | None:
        """Not ready while a fail-closed sink cannot write (its requests get 503 meanwhile), or has a problem
        an operator must clear (`SinkWriter.problem`: requests go on, since their events are written)."""
        sink = self.sink_of(connection)
        if sink is None or not sink.fail_closed:
            return None
        if not sink.healthy:
            return f"{sink.name}: cannot write ({sink.last_error})"
        problem = sink.problem()
        return f"{sink.name}: {problem}" if problem else None

    @hookimpl
    async def kubegate_audit_event(self, event: AuditEvent, connection: Connection) -> None:
        sink = self.sink_of(connection)
        if sink is not None:
            await sink.submit(event)
