"""Recording sessions as they run: frames become asciicast events in memory, and a flusher writes them out.

Memory stays bounded and a crash loses little: every open recording is written to storage every
``flush_interval_seconds`` (0.5 s by default) by one background task, and early when its buffer passes
``max_buffer_bytes``. When storage is slower than the session, the frame hook waits for the write in
progress once the buffer is past twice that (the session slows down rather than the gateway's memory
growing); a storage stalled for five seconds costs the recording its buffered events (marked incomplete),
never the session. A failed write is logged, counted, and marks the recording incomplete.

What reaches storage is masked: output has been through the masking plugin when it is enabled for this
caller (the recording hook runs last); otherwise — no masking plugin, an exempt caller, or a base64
protocol the masking plugin does not read — and for typed input, each stream (stdin, stdout, stderr) goes
through a stream masker of its own (``kubegate_record_stream``), which holds back what could still become
part of a secret: a secret is masked however the stream is cut (keystrokes, frames, flush ticks, lines of
any length), and one still in progress when the session ends is hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlmodel import Session as DBSession

from kubegate.core.flow import BodyTransformer, Frame, FrameDirection, Session

from . import frames, store
from .cast import CastWriter
from .storage import Storage

if TYPE_CHECKING:
    from kubegate.core.db import Database

log = logging.getLogger("kubegate.recording")

MAX_STATUS_BYTES = 64 * 1024  # a Status document is small; more is not worth keeping
DROP_FACTOR = 8  # buffered events are dropped past this many times max_buffer_bytes (see relieve)
STALL_SECONDS = 5.0

# A new masked stream for stored text (`kubegate_record_stream`): one per stream recorded unmasked.
MaskedStreamFactory = Callable[[], BodyTransformer]


class Recording:
    """One session being recorded. Only the event loop touches it; storage calls go to worker threads."""

    def __init__(
        self,
        record: store.SessionRecord,
        storage: Storage | None,
        *,
        masked_stream: MaskedStreamFactory,
        mask_output: bool,
        record_input: bool,
        max_buffer_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.record = record
        self.storage = storage
        self.masked_stream, self.mask_output, self.record_input = masked_stream, mask_output, record_input
        self.max_buffer_bytes = max_buffer_bytes
        self.clock = clock
        self.t0 = clock()
        title = f"{record.user}@{record.connection}: {record.namespace}/{record.pod}"
        if record.command:
            title += " $ " + " ".join(record.command)
        self.writer = CastWriter(record.started, title=title)
        self.lock = asyncio.Lock()
        self.seq = 0
        self.cast_bytes = 0
        self.write_errors = 0
        self.dropped_bytes = 0
        self.status = bytearray()
        self.input_stream: BodyTransformer | None = None  # typed input, masked
        self.output_streams: dict[int, BodyTransformer] = {}  # output no plugin masked, per channel
        self.initial_size: tuple[int, int] | None = None
        self.finished = False
        self.stall_seconds = STALL_SECONDS

    # -- frames -----------------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock() - self.t0

    def on_frame(self, frame: Frame) -> None:
        """Turn one relayed message (as the plugins before this one left it) into events."""
        if frame.direction is FrameDirection.CLIENT_TO_UPSTREAM:
            if not frame.drop:
                self._from_client(frame.data, frame.text)
            return
        pieces = [(data, frame.text) for data in frame.before]  # held output: the frame's own kind
        if not frame.drop and frame.data:
            pieces.append((frame.data, frame.text))
        for data, text in pieces:
            self._from_upstream(data, text)

    def _from_client(self, data: bytes, text: bool) -> None:
        split = frames.split_frame(data, text)
        if split is None:
            return
        channel, payload = split
        if channel == frames.STDIN and self.record_input and payload:
            # Each frame's input is an event at its time: a keystroke, a paste, or what a later key
            # released (the rest of a secret, masked) — the stream holds what could still be a secret.
            if self.input_stream is None:
                self.input_stream = self.masked_stream()
            typed = self.input_stream.feed(payload)
            if typed:
                self.writer.input(self.now(), typed)
        elif channel == frames.RESIZE:
            for width, height in frames.parse_resize(payload):
                if self.initial_size is None:
                    self.initial_size = (width, height)
                self.writer.resize(self.now(), width, height)
        self._check_size()

    def _from_upstream(self, data: bytes, text: bool) -> None:
        split = frames.split_frame(data, text)
        if split is None:
            return
        channel, payload = split
        if channel in (frames.STDOUT, frames.STDERR) and payload:
            # The masking plugin reads binary frames only: base64-protocol output is masked here.
            if self.mask_output or text:
                stream = self.output_streams.get(channel)
                if stream is None:
                    stream = self.output_streams[channel] = self.masked_stream()
                shown = stream.feed(payload)
                if shown:
                    self._output(channel, shown)
            else:
                self._output(channel, payload)
        elif channel == frames.STATUS and len(self.status) < MAX_STATUS_BYTES:
            self.status += payload[: MAX_STATUS_BYTES - len(self.status)]
        self._check_size()

    def _output(self, channel: int, data: bytes) -> None:
        self.writer.output(self.now(), data, "stderr" if channel == frames.STDERR else "stdout")

    def _check_size(self) -> None:
        """The last safety net (frames of both directions arriving while a write stalls): past
        `DROP_FACTOR` times the buffer size, the buffered events go."""
        if self.writer.pending_bytes > DROP_FACTOR * self.max_buffer_bytes:
            self._drop("the buffer overflowed")

    def _drop(self, why: str) -> None:
        lost = self.writer.drop_pending()
        self.dropped_bytes += lost
        if not self.record.incomplete:
            log.warning(
                "recording %s: %s, dropped %d bytes (the recording has a gap)", self.record.id, why, lost
            )
        self.record.incomplete = True

    async def relieve(self) -> None:
        """After a frame: write early when the buffer is past `max_buffer_bytes`. When a write is already
        in progress the session waits for it (backpressure) once the buffer is past twice the size; a
        storage stalled for `stall_seconds` costs the recording its buffered events, never the session."""
        pending = self.writer.pending_bytes
        if pending < self.max_buffer_bytes or (self.lock.locked() and pending < 2 * self.max_buffer_bytes):
            return
        try:
            async with asyncio.timeout(self.stall_seconds):
                await self.lock.acquire()
        except TimeoutError:
            self._drop(f"storage stalled for {self.stall_seconds:g} s")
            return
        try:
            await self._write()
        finally:
            self.lock.release()

    # -- storage ----------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what is buffered. What the streams hold as a possible secret stays held (at most a stream
        masker's bound each): cut here, a secret would be whole in neither part."""
        async with self.lock:
            await self._write()

    async def _write(self) -> None:
        """Write the buffer (the caller holds the lock). A write is never cancelled half-way by us: a
        numbered chunk must not be written twice."""
        text = self.writer.take()
        if not text or self.storage is None:
            return
        seq = self.seq
        try:
            await asyncio.to_thread(self.storage.append, self.record.id, self.record.location, seq, text)
        except Exception as exc:
            self.write_errors += 1
            self.record.incomplete = True
            log.warning("recording %s: write %d failed: %s", self.record.id, seq, exc)
            if seq == 0:
                # The header was in that batch: the next write starts the recording again.
                self.writer.header_written = False
            return
        self.seq += 1
        self.cast_bytes += len(text.encode("utf-8"))

    async def finish(self, session: Session) -> None:
        """The session ended: write everything, then what the row needs."""
        if self.finished:
            return
        self.finished = True
        t = self.now()
        if self.input_stream is not None:
            typed = self.input_stream.end()
            if typed:
                self.writer.input(t, typed)
        for channel, stream in sorted(self.output_streams.items()):
            shown = stream.end()
            if shown:
                self._output(channel, shown)
        if self.storage is not None:
            self.writer.finish(t)
        await self.flush()

    def end_values(self, session: Session) -> dict[str, object]:
        code, reason = frames.exit_status(bytes(self.status))
        if code is None and not reason and self.record.kind != store.PORTFORWARD:
            reason = f"no exit status received (WebSocket closed with {session.close_code})"
        width, height = self.initial_size or (None, None)
        return {
            "ended": session.ended or time.time(),
            "exit_code": code,
            "exit_reason": reason,
            "bytes_in": session.bytes_from_client,
            "bytes_out": session.bytes_from_upstream,
            "width": width,
            "height": height,
            "events": self.writer.events,
            "cast_bytes": self.cast_bytes,
            "incomplete": self.record.incomplete,
        }


class Recorder:
    """The recordings of one gateway and the task that flushes them."""

    def __init__(
        self, database: Database, storage: Storage, *, flush_interval: float, max_buffer_bytes: int
    ) -> None:
        self.database, self.storage = database, storage
        self.flush_interval = flush_interval
        self.max_buffer_bytes = max_buffer_bytes
        self.open: dict[str, Recording] = {}
        self.write_errors = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flusher(), name="kubegate-recording-flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Sessions may outlive this (the server closes them afterwards): write what they have so far.
        await self._flush_all()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self._flush_all()
            except Exception:  # never let one bad recording stop the others from being written
                log.exception("recording flush failed")

    async def _flush_all(self) -> None:
        busy = [r for r in self.open.values() if not r.lock.locked()]
        if busy:
            await asyncio.gather(*(r.flush() for r in busy))

    async def begin(self, recording: Recording) -> None:
        record = recording.record
        try:
            await self.database.run(lambda s: store.add(s, record.model_copy()))
        except Exception as exc:
            log.warning("recording %s: cannot insert its row: %s", record.id, exc)
            record.incomplete = True
        self.open[record.id] = recording

    async def end(self, session: Session, recording: Recording) -> None:
        record = recording.record
        try:
            await recording.finish(session)
        finally:
            self.open.pop(record.id, None)
        self.write_errors += recording.write_errors
        values = recording.end_values(session)
        try:
            await self.database.run(lambda s: _upsert(s, record, values))
        except Exception as exc:
            log.warning("recording %s: cannot update its row: %s", record.id, exc)


def _upsert(s: DBSession, record: store.SessionRecord, values: dict[str, object]) -> None:
    row = store.get(s, record.id)
    if row is None:  # the insert at the start failed: keep what we know now
        row = record.model_copy()
    for key, value in values.items():
        setattr(row, key, value)
    s.add(row)
