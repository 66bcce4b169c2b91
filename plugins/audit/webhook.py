"""The `audit-webhook` plugin: audit events POSTed in batches to a collector (a SIEM, Loki, Splunk HEC…).

Events are first appended to a spool on local disk (segment files under `state_dir`, JSON lines in UTF-8), then a sender posts
them in batches, oldest first, retrying failures with backoff (1 s … 60 s) for as long as it takes: the
memory used is one batch, a receiver that is down loses nothing, and the spool survives a restart. Delivery
is at least once — after a crash mid-batch a batch may come twice; each event carries a unique `id`.
The spool is bounded (`max_spool_bytes`); when it is full the sink counts as failing (503 when
`on_failure: closed`; events are dropped, loudly, when open).
"""

from __future__ import annotations

import asyncio
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
        return sorted(self.directory.glob("*.jsonl"), key=lambda p: int(p.stem))

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.segments())

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
            # Split at "\n" only: `splitlines` also splits at U+2028, U+0085…, which JSON leaves unescaped.
            return path, path.read_bytes().decode().split("\n")[:-1]


class WebhookSink(SinkWriter):
    """`write` puts a batch in the spool (a local disk write); `_send` delivers the spool."""

    name = "audit-webhook"

    def __init__(self, settings: AuditWebhookSettings, spool_dir: Path):
        super().__init__(settings)
        self.hook_settings = settings
        self.spool = Spool(spool_dir, settings.max_spool_bytes)
        self.delivered = 0
        self._spooled = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.spool.append(batch)  # in the writer's thread
        self._loop.call_soon_threadsafe(self._spooled.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        super().start()
        self._sender = asyncio.create_task(self._send(), name="audit webhook sender")

    async def _send(self) -> None:
        backoff = first = self.hook_settings.retry_seconds
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
                step = self.hook_settings.post_batch
                index = 0
                while index < len(lines):
                    chunk = lines[index : index + step]
                    body = b'{"events":[' + ",".join(chunk).encode() + b"]}"
                    try:
                        await self._post(body)
                    except Exception as exc:
                        log.warning(
                            "audit webhook %s: %s; retrying in %.0f s", self.hook_settings.url, exc, backoff
                        )
                        if self._closing:
                            return  # the spool keeps them for the next start
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 60.0)
                        continue
                    backoff = first
                    index += len(chunk)
                    self.delivered += len(chunk)
                path.unlink(missing_ok=True)
        finally:
            await self._session.close()

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", **self.hook_settings.headers}
        async with self._session.post(self.hook_settings.url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"HTTP {response.status}")

    async def close(self, drain_seconds: float = 10.0) -> None:
        await super().close(drain_seconds)
        self._spooled.set()
        if self._sender is not None:
            try:
                await asyncio.wait_for(self._sender, drain_seconds)
            except TimeoutError:
                self._sender.cancel()


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
