"""A sink's queue when its writes are slow or fail: no request waits forever for an event, nothing waits on
a sink that cannot write, the queue is bounded by events and by bytes, and the events of requests without
an identity (which anyone can send) neither hold memory nor push out the events of requests let through.

The writer here is a thread the test lets go on (`release`), never a clock: nothing asserts a duration."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from kubegate.core.errors import StatusError
from kubegate.core.flow import AuditEvent
from kubegate.plugins.audit.sink import (
    FIELD_MAX_CHARS,
    UNRECORDED_SOURCES_MAX,
    SinkSettings,
    SinkWriter,
    estimated_size,
    record_size,
)


class Writer(SinkWriter):
    """Writes (or fails, while `failing`) each batch once the test releases it."""

    name = "test"

    def __init__(self, settings: SinkSettings, *, failing: bool = False, held: bool = False):
        super().__init__(settings)
        self.failing = failing
        self.batches: list[list[dict[str, Any]]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        if not held:
            self.release.set()

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.started.release()
        self.release.wait(30)
        if self.failing:
            raise OSError("the spool is full")
        self.batches.append(batch)

    async def writing(self) -> None:
        """Until the writer thread holds a batch."""
        await until(lambda: self.started.acquire(blocking=False), "the writer to take a batch")

    @property
    def written_kinds(self) -> list[str]:
        return [record["kind"] for batch in self.batches for record in batch]


def event(number: int, *, user: str | None = "alice", source: str = "10.0.0.1", **data: Any) -> AuditEvent:
    identity = {"user": user} if user is not None else None
    return AuditEvent(kind="request", flow_id=f"r{number}", connection="prod", time=1000.0 + number,
                      data={"identity": identity, "source": source, "status": 200, **data})  # fmt: skip


def settings(**values: Any) -> SinkSettings:
    return SinkSettings(**{"linger_ms": 0, **values})


async def until(condition: Any, what: str) -> None:
    """Until `condition()` holds; a generous bound only so that a broken sink fails the test, not hangs it."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still waiting for {what}")


async def settled(*tasks: asyncio.Future[Any]) -> None:
    """Let the loop run what is ready (the tasks' submits up to their first wait)."""
    for _ in range(20):
        if all(task.done() for task in tasks):
            return
        await asyncio.sleep(0)


async def failed(sink: Writer) -> None:
    """Make the sink fail a write (fail-closed: unhealthy from then on, until a write succeeds)."""
    sink.failing = True
    sink.release.set()
    first = asyncio.ensure_future(sink.submit(event(0)))
    await until(lambda: not sink.healthy, "a failed write")
    await first


async def test_an_event_the_queue_drops_ends_its_request_and_the_batch_being_written_is_kept():
    sink = Writer(settings(on_failure="closed", queue_max=3), held=True)
    sink.start()
    first = asyncio.ensure_future(sink.submit(event(1)))
    await sink.writing()  # event 1 is being written
    behind = [asyncio.ensure_future(sink.submit(event(n))) for n in (2, 3, 4)]  # the 4th pushes out the 2nd
    await settled(*behind)
    assert len(sink.queue) == 3 and sink.dropped == 1
    assert behind[0].done(), "the request of the dropped event still waits: nobody would ever resolve it"
    assert [record["request_id"] for record, _, _ in sink.queue] == ["r1", "r3", "r4"]
    assert not first.done() and not behind[1].done() and not behind[2].done()
    sink.release.set()
    await asyncio.gather(first, *behind)
    await sink.close()
    assert [record["request_id"] for batch in sink.batches for record in batch] == ["r1", "r3", "r4"]
    assert not sink.queue and sink.queued_bytes == 0


async def test_a_failed_write_ends_every_waiting_request_and_keeps_their_events():
    sink = Writer(settings(on_failure="closed", batch_max=1), failing=True, held=True)
    sink.start()
    tasks = [asyncio.ensure_future(sink.submit(event(n))) for n in range(5)]
    await sink.writing()  # a batch of one: four events wait behind it
    sink.release.set()
    await until(lambda: not sink.healthy, "a failed write")
    await settled(*tasks)
    assert all(task.done() for task in tasks), "requests behind the failed batch still wait"
    assert len(sink.queue) == 5 and sink.dropped == 0  # kept for the retry
    assert all(future is None for _, future, _ in sink.queue)
    sink.failing = False
    await until(lambda: not sink.queue, "the queue to be written")
    assert [record["request_id"] for batch in sink.batches for record in batch] == [f"r{n}" for n in range(5)]
    await sink.close()


async def test_while_a_fail_closed_sink_fails_requests_are_refused_and_nothing_waits():
    sink = Writer(settings(on_failure="closed"))
    sink.start()
    await failed(sink)
    with pytest.raises(StatusError) as refused:
        sink.gate()
    assert refused.value.code == 503
    later = asyncio.ensure_future(sink.submit(event(1)))  # a request that was answered meanwhile (a 503)
    await settled(later)
    assert later.done(), "a submit to a sink that cannot write holds its request"
    assert [record["request_id"] for record, _, _ in sink.queue] == ["r0", "r1"]  # kept, not lost
    sink.failing = False
    await until(lambda: not sink.queue, "the queue to be written")
    sink.gate()  # writes again: requests go on
    await sink.close()


async def test_unauthenticated_events_are_counted_per_source_not_queued_while_the_sink_fails():
    sink = Writer(settings(on_failure="closed"))
    sink.start()
    await failed(sink)
    queued = len(sink.queue)
    flood = [event(n, user=None, source=f"192.0.2.{n % 3}", status=401) for n in range(3000)]
    flood += [
        event(n, user=None, source=f"198.51.100.{n}", status=401) for n in range(UNRECORDED_SOURCES_MAX)
    ]
    tasks = [asyncio.ensure_future(sink.submit(e)) for e in flood]
    await settled(*tasks)
    assert all(task.done() for task in tasks)
    assert len(sink.queue) == queued, "401s are queued while the sink cannot write"
    assert sink.unrecorded == len(flood)
    sink.failing = False
    await until(lambda: not sink.queue and not sink._unrecorded, "the queue and the summary to be written")
    await sink.close()
    summaries = [record for batch in sink.batches for record in batch if record["kind"] == "unrecorded"]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["connection"] == "prod" and summary["data"]["requests"] == len(flood)
    sources = summary["data"]["sources"]
    assert len(sources) == UNRECORDED_SOURCES_MAX + 1  # bounded: the rest are counted as "other"
    assert sources["192.0.2.0"] == 1000 and sum(sources.values()) == len(flood)
    assert "r0" in [record["request_id"] for batch in sink.batches for record in batch]


async def test_unauthenticated_events_do_not_push_out_the_events_of_requests_let_through():
    sink = Writer(settings(on_failure="open", queue_max=10), failing=True)
    sink.start()
    for n in range(5):
        await sink.submit(event(n))  # alice's, let through while the store is down (fail-open)
    for n in range(1000):
        await sink.submit(event(100 + n, user=None, status=401))
    assert [record["request_id"] for record, _, _ in sink.queue] == [f"r{n}" for n in range(5)]
    assert sink.dropped == 0 and sink.unrecorded == 1000
    await sink.close(drain_seconds=0)


@pytest.mark.parametrize("on_failure", ["open", "closed"])
async def test_the_queue_is_bounded_by_the_size_of_its_events(on_failure):
    sink = Writer(settings(on_failure=on_failure, queue_max_bytes=1 << 20), failing=True)
    sink.start()
    if on_failure == "closed":
        await failed(sink)
    long = "\x80" * (FIELD_MAX_CHARS + 100)  # cut to FIELD_MAX_CHARS in the record
    for n in range(1000):
        await sink.submit(event(n, user_agent=long, kubectl_command=long, kubectl_session=long))
    assert sink.queued_bytes <= 1 << 20
    assert sink.queued_bytes == sum(size for _, _, size in sink.queue)
    assert len(sink.queue) < 100 and sink.dropped + len(sink.queue) == 1000 + (on_failure == "closed")
    assert sink.queue[-1][0]["request_id"] == "r999"  # the oldest go first
    await sink.close(drain_seconds=0)


async def test_a_fail_closed_sink_whose_queue_is_full_refuses_new_requests():
    sink = Writer(settings(on_failure="closed", queue_max=4), held=True)
    sink.start()
    tasks = [asyncio.ensure_future(sink.submit(event(1)))]
    await sink.writing()
    sink.gate()  # healthy, room left
    tasks += [asyncio.ensure_future(sink.submit(event(n))) for n in (2, 3, 4)]
    await settled(*tasks)
    with pytest.raises(StatusError) as refused:
        sink.gate()
    assert refused.value.code == 503 and "events waiting" in refused.value.message
    sink.release.set()
    await asyncio.gather(*tasks)
    sink.gate()
    await sink.close()


async def test_requests_waiting_for_their_events_count_in_the_queue_size():
    sink = Writer(settings(on_failure="closed", queue_max_bytes=1 << 20), held=True)
    sink.start()
    tasks = [asyncio.ensure_future(sink.submit(event(n))) for n in range(200)]
    await settled(*tasks)
    # Each small event holds its request's task and flow meanwhile: the size bound counts that too.
    assert sink.queued_bytes <= 1 << 20 and len(sink.queue) < 200 and sink.dropped > 0
    assert sum(task.done() for task in tasks) == sink.dropped
    sink.release.set()
    await asyncio.gather(*tasks)
    await sink.close()


def test_the_size_estimate_counts_text_and_keys():
    assert estimated_size({"ab": "xyz", "n": 1, "l": ["pq", None]}) == 2 + 3 + 1 + 8 + 1 + 2 + 8
    # The size counted for the queue is the JSON's, and the walk's where orjson refuses the data
    assert record_size({"ab": "x" * 5000}) == len('{"ab":""}') + 5000
    assert record_size({"ab": "lone \ud800 " + "x" * 5000}) == estimated_size(
        {"ab": "lone \ud800 " + "x" * 5000}
    )
