"""The `audit-webhook` plugin: audit events POSTed in batches to a collector (a SIEM, Loki, Splunk HEC…).

Events are first appended to a spool on local disk (segment files under `state_dir`, JSON lines in UTF-8),
then a sender posts them in batches, oldest first, retrying failures with backoff (1 s … 60 s) for as long
as it takes: the memory used is one batch, a receiver that is down loses nothing, and the spool survives a
restart. Delivery is at least once — after a crash mid-batch a batch may come twice; each event carries a
unique `id`. The spool is bounded (`max_spool_bytes`); when it is full the sink counts as failing (503 when
`on_failure: closed`; events are dropped, loudly, when open).

A batch the receiver refuses for what it holds (a 4xx but 401, 404, 405, 407, 408 and 429, which are about
the receiver or the moment: retried) is sent again one event per request; an event refused alone while the
receiver takes an empty batch goes to the dead-letter file next to the segments, and delivery goes on
after it (one refused event stopped every later one, for good). See docs/audit.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import Field

from kubegate.core.config import WebhookURL

from . import chain
from .sink import SinkPlugin, SinkSettings, SinkWriter

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-webhook"
log = logging.getLogger("kubegate.audit")
SEGMENT_BYTES = 1 << 20
DEAD_LETTER = "dead-letter.jsonl"  # in the spool directory, next to the numbered segments
# Answers about the receiver or the moment, not the events sent: retried like a 5xx. (401/407: our
# credentials; 404/405: the URL; 408/429: later.) Any other 4xx refuses what the batch holds.
RETRIED_4XX = frozenset({401, 404, 405, 407, 408, 429})


class AuditWebhookSettings(SinkSettings):
    url: WebhookURL = Field(description="https URL (http only on loopback) that takes POSTed JSON.")
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with every POST (e.g. a bearer).")
    post_batch: int = Field(100, ge=1, le=10_000, description='Events per POST: `{"events": [...]}`.')
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    retry_seconds: float = Field(
        1.0, gt=0, le=60, description="First wait after a failed POST; doubles up to 60 s."
    )
    spool_dir: Path = Field(
        Path("audit-spool"), description="Where undelivered events wait (relative: to `state_dir`)."
    )
    max_spool_bytes: int = Field(1 << 30, ge=1 << 20, description="Spool size at most.")


class Spool:
    """Numbered segment files of JSON lines: appended to at the end, consumed from the start."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.lock = threading.Lock()  # the writer thread appends while the sender's thread reads
        directory.mkdir(parents=True, exist_ok=True)

    def segments(self) -> list[Path]:
        return sorted(
            (p for p in self.directory.glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem)
        )

    def size(self) -> int:
        """The segments and the dead-letter file: what the spool holds on disk."""
        dead = self.directory / DEAD_LETTER
        return sum(p.stat().st_size for p in self.segments()) + (dead.stat().st_size if dead.exists() else 0)

    def append(self, records: list[dict[str, Any]]) -> None:
        # UTF-8 as it is (the canonical text, as the chain's sinks write it): ASCII escapes made a byte 0xFF of
        # a User-Agent six bytes, and lone surrogates, large integers and other keys are handled as there.
        data = "".join(chain.canonical(r) + "\n" for r in records).encode()
        if self.size() + len(data) > self.max_bytes:
            raise OSError(f"the spool is full ({self.max_bytes} bytes): the receiver is not taking events")
        with self.lock:
            segments = self.segments()
            current = segments[-1] if segments else self.directory / "1.jsonl"
            if current.exists() and current.stat().st_size >= SEGMENT_BYTES:
                current = self.directory / f"{int(current.stem) + 1}.jsonl"
            with open(current, "ab") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())

    def oldest(self) -> tuple[Path, list[str]] | None:
        """The oldest segment and its lines. When only one is left it is closed first (appends go to a new
        one), so a segment is never appended to after it was read."""
        with self.lock:
            segments = self.segments()
            if not segments or (len(segments) == 1 and segments[0].stat().st_size == 0):
                return None
            if len(segments) == 1:
                (self.directory / f"{int(segments[0].stem) + 1}.jsonl").touch()
            path = segments[0]
            # Split at "\n" only (`splitlines` also splits at U+2028, U+0085…, which JSON leaves unescaped), as
            # bytes: a line a crash cut short has no "\n" (its event was never spooled whole) and may end
            # inside a character. Undecodable bytes are replaced: the receiver refuses such a line on its own.
            lines = path.read_bytes().split(b"\n")
            return path, [line.decode(errors="replace") for line in lines[:-1]]

    def dead_letter(self, line: str) -> None:
        """Keep an event the receiver refused (as it was spooled: one JSON line, ready to be sent again)."""
        with self.lock, open(self.directory / DEAD_LETTER, "ab") as out:
            out.write(line.encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())

    def has_dead_letters(self) -> bool:
        """Whether the dead-letter file holds events (until an operator moves it away)."""
        try:
            return (self.directory / DEAD_LETTER).stat().st_size > 0
        except FileNotFoundError:
            return False


class Refused(RuntimeError):
    """The receiver refused what a POST held (a 4xx that says so): the same body is refused again."""


class WebhookSink(SinkWriter):
    """`write` puts a batch in the spool (a local disk write); `_send` delivers the spool."""

    name = "audit-webhook"

    def __init__(self, settings: AuditWebhookSettings, spool_dir: Path):
        super().__init__(settings)
        self.hook_settings = settings
        self.spool = Spool(spool_dir, settings.max_spool_bytes)
        self.delivered = 0
        self.dead_lettered = 0  # since start; the dead-letter file holds every one not yet cleared
        self._backoff = settings.retry_seconds
        self._spooled = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def batch_bytes_max(self) -> int:
        # A batch goes into the spool whole or not at all: one larger than the spool never fitted, and the sink
        # failed for good (a burst of 401s with long headers did it to a 1 MiB spool). An eighth: the estimate
        # counts characters, and UTF-8 takes up to four bytes for one.
        return min(super().batch_bytes_max, self.hook_settings.max_spool_bytes // 8)

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.spool.append(batch)  # in the writer's thread
        self._loop.call_soon_threadsafe(self._spooled.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        super().start()
        self._sender = asyncio.create_task(self._send(), name="audit webhook sender")

    async def _send(self) -> None:
        self._backoff = self.hook_settings.retry_seconds
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.hook_settings.timeout_seconds)
        )
        try:
            while True:
                found = await asyncio.to_thread(self.spool.oldest)
                if found is None:
                    if self._closing and not self.queue:
                        return
                    self._spooled.clear()
                    await self._spooled.wait()
                    continue
                path, lines = found
                if not await self._deliver(lines):
                    return  # closing: the spool keeps them for the next start
                path.unlink(missing_ok=True)
        finally:
            await self._session.close()

    async def _deliver(self, lines: list[str]) -> bool:
        """POST a segment's events in batches, in order; False when closing cut it short."""
        index, one_by_one_until = 0, 0
        while index < len(lines):
            step = 1 if index < one_by_one_until else self.hook_settings.post_batch
            chunk = lines[index : index + step]
            try:
                await self._post(b'{"events":[' + ",".join(chunk).encode() + b"]}")
            except Refused as exc:
                if len(chunk) > 1:  # which event? each alone, then batches again after them
                    one_by_one_until = index + len(chunk)
                    continue
                if await self._takes_an_empty_batch():  # it is this event, not every event
                    try:
                        await asyncio.to_thread(self.spool.dead_letter, chunk[0])
                    except OSError as error:  # not kept aside: it stays first in the spool
                        if not await self._wait_after(error):
                            return False
                        continue
                    self.dead_lettered += 1
                    log.error("audit webhook %s refused event %s (%s): kept in %s, delivery goes on",
                              self.hook_settings.url, _event_id(chunk[0]), exc, self.spool.directory / DEAD_LETTER)  # fmt: skip
                    index += 1
                    continue
                if not await self._wait_after(exc):
                    return False
                continue
            except Exception as exc:
                if not await self._wait_after(exc):
                    return False
                continue
            self._backoff = self.hook_settings.retry_seconds
            index += len(chunk)
            self.delivered += len(chunk)
        return True

    async def _takes_an_empty_batch(self) -> bool:
        """Whether the receiver takes a POST of no events: an event it refused alone is then the problem, not
        the receiver (a wrong token or a WAF refusing everything must not send every event to dead letters)."""
        try:
            await self._post(b'{"events":[]}')
        except Exception:
            return False
        return True

    async def _wait_after(self, exc: Exception) -> bool:
        """Back off after a failed POST; False when closing."""
        log.warning("audit webhook %s: %s; retrying in %.0f s", self.hook_settings.url, exc, self._backoff)
        if self._closing:
            return False
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 60.0)
        return True

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", **self.hook_settings.headers}
        async with self._session.post(self.hook_settings.url, data=body, headers=headers) as response:
            if 400 <= response.status < 500 and response.status not in RETRIED_4XX:
                raise Refused(f"HTTP {response.status}")
            if response.status >= 300:
                raise RuntimeError(f"HTTP {response.status}")

    def problem(self) -> str | None:
        if not self.spool.has_dead_letters():
            return None
        return (
            f"the receiver refused audit events ({self.dead_lettered} since start), kept in "
            f"{self.spool.directory / DEAD_LETTER}: deliver them another way, then move the file away"
        )

    async def close(self, drain_seconds: float = 10.0) -> None:
        await super().close(drain_seconds)
        self._spooled.set()
        if self._sender is not None:
            try:
                await asyncio.wait_for(self._sender, drain_seconds)
            except TimeoutError:
                self._sender.cancel()


def _event_id(line: str) -> str:
    try:
        return str(json.loads(line).get("id"))
    except (ValueError, AttributeError):
        return "(not JSON)"


def make_sink(gateway: Gateway, settings: AuditWebhookSettings | None) -> WebhookSink:
    if settings is None:
        raise ValueError("enabled on a connection, but `plugins.audit-webhook.url` is not set")
    spool = settings.spool_dir
    spool = spool if spool.is_absolute() else gateway.settings.state_dir / spool
    try:
        return WebhookSink(settings, spool)
    except OSError as exc:
        raise ValueError(f"cannot use the spool {spool}: {exc.strerror}") from None


PLUGIN = SinkPlugin(PLUGIN_NAME, __name__, AuditWebhookSettings, make_sink)
