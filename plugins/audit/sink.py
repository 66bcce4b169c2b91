"""What every audit sink shares: a bounded queue, a writer task that writes batches, health, fail mode.

A request never waits for a fail-open sink. A fail-closed sink makes the request that produced an event
wait until the event is written (after its response went out: the client is not slowed), and while the
sink cannot write, new requests are refused with 503 (`gate`) until a retry succeeds. Events are never
dropped by a failed write: a failed batch is retried, in order, with backoff up to one second (only a queue past `queue_max` drops its oldest event, loudly).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.errors import StatusError
from kubegate.core.flow import AuditEvent

log = logging.getLogger("kubegate.audit")


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
    linger_ms: float = Field(
        10, ge=0, le=1000, description="How long the writer waits for more events before writing a batch."
    )


def make_record(event: AuditEvent) -> dict[str, Any]:
    """The stored form of an event, before the store adds its chain position (`seq`)."""
    return {
        "id": event.id,
        "time": event.time,
        "kind": event.kind,
        "connection": event.connection,
        "request_id": event.flow_id,
        "data": event.data,
    }


class SinkWriter:
    """Subclasses implement `write(batch)` (may block: it runs in a thread) and may override `start`."""

    name = "sink"

    def __init__(self, settings: SinkSettings):
        self.settings = settings
        self.queue: collections.deque[tuple[dict[str, Any], asyncio.Future[None] | None]] = (
            collections.deque()
        )
        self.healthy = True
        self.last_error = ""
        self.written = 0
        self.dropped = 0
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

    async def submit(self, event: AuditEvent) -> None:
        if len(self.queue) >= self.settings.queue_max:
            self.queue.popleft()
            self.dropped += 1
            log.error("audit sink %s: queue full (%d events), dropped the oldest", self.name, len(self.queue))
        future: asyncio.Future[None] | None = None
        if self.fail_closed:
            future = asyncio.get_running_loop().create_future()
        self.queue.append((make_record(event), future))
        self._wakeup.set()
        if future is not None:
            # Resolved when written, or at the first failed attempt (the event stays queued for retry).
            with contextlib.suppress(Exception):
                await future

    def gate(self) -> None:
        """Refuse new requests while a fail-closed sink cannot write."""
        if self.fail_closed and not self.healthy:
            raise StatusError(
                503,
                f"the audit store ({self.name}) cannot record requests: {self.last_error}; requests are "
                "refused until it can",
            )

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
            batch = [self.queue[i] for i in range(min(len(self.queue), self.settings.batch_max))]
            try:
                await asyncio.to_thread(self.write, [record for record, _ in batch])
            except Exception as exc:
                first_failure = self.healthy
                self.healthy = False
                self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if first_failure:
                    log.error("audit sink %s cannot write: %s", self.name, self.last_error)
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(RuntimeError(self.last_error))
                if self._closing and time.monotonic() > self._deadline:
                    log.error("audit sink %s: %d events not written at shutdown", self.name, len(self.queue))
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.1
            if not self.healthy:
                log.warning("audit sink %s writes again", self.name)
            self.healthy, self.last_error = True, ""
            self.written += len(batch)
            for _ in batch:
                _, future = self.queue.popleft()
                if future is not None and not future.done():
                    future.set_result(None)

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
