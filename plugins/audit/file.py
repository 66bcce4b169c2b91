"""The `audit-file` plugin: audit events as JSON lines, hash-chained, rotated by size.

Each line is `{"record": {...}, "prev_hash": ..., "hash": ..., "signature": ...}` — the same chain as
`audit-db` (see chain.py), continued across rotated files: `kubegate audit verify --file F [F …]` checks
them. On start the chain resumes from the last line of the current file.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kubegate.core.flow import AuditEvent, Decision, Flow
from kubegate.core.plugins import hookimpl

from . import chain
from .sink import SinkSettings, SinkWriter

if TYPE_CHECKING:
    from pydantic import BaseModel

    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-file"


class AuditFileSettings(SinkSettings):
    path: Path = Field(Path("audit/kubegate-audit.jsonl"), description="The file (relative: to `state_dir`).")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate when the file passes this size.")
    keep: int = Field(10, ge=1, le=10_000, description="Rotated files kept (`FILE.1` newest … `FILE.N`).")
    signing_algorithm: Literal["hmac-sha256", "ed25519"] | None = Field(None, description="As in audit-db.")
    signing_key_file: Path | None = Field(None, description="As in audit-db.")


class FileSink(SinkWriter):
    name = "audit-file"

    def __init__(self, settings: AuditFileSettings, path: Path, signer: chain.Signer | None):
        super().__init__(settings)
        self.file_settings, self.path, self.signer = settings, path, signer
        self.seq, self.prev = last_link(path)

    def write(self, batch: list[dict[str, Any]]) -> None:
        # After a config reload two sinks of this file may live side by side for a while (the old one
        # finishing its requests): each write continues from the file's own last line, under one lock.
        with _lock_for(self.path):
            self.seq, self.prev = last_link(self.path)
            self._append(batch)

    def _append(self, batch: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines, seq, prev = [], self.seq, self.prev
        for record in batch:
            seq += 1
            text = chain.canonical({**record, "seq": seq})
            digest = chain.link(prev, text)
            signature = self.signer.sign(digest) if self.signer is not None else ""
            lines.append(
                f'{{"hash":"{digest}","prev_hash":"{prev}","record":{text},"signature":"{signature}"}}\n'
            )
            prev = digest
        with open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
        self.seq, self.prev = seq, prev
        if self.path.stat().st_size >= self.file_settings.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        keep = self.file_settings.keep
        oldest = self.path.with_name(f"{self.path.name}.{keep}")
        oldest.unlink(missing_ok=True)
        for index in range(keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))


_FILE_LOCKS: dict[Path, threading.Lock] = {}  # per file, for the whole process (see FileSink.write)


def _lock_for(path: Path) -> threading.Lock:
    return _FILE_LOCKS.setdefault(path.resolve(), threading.Lock())


def last_link(path: Path) -> tuple[int, str]:
    """(seq, hash) of the last line of the current file, or of the newest rotated one."""
    for candidate in (path, path.with_name(f"{path.name}.1")):
        line = _last_line(candidate)
        if line:
            entry = json.loads(line)
            return int(entry["record"]["seq"]), str(entry["hash"])
    return 0, chain.GENESIS


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 20)))
            lines = f.read().splitlines()
    except OSError:
        return ""
    return lines[-1].decode() if lines else ""


def stored_from_files(paths: list[Path]) -> Any:
    """The chain records of the files, oldest first (give rotated files oldest first: F.2 F.1 F)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                    text = chain.canonical(entry["record"])
                    yield chain.Stored(seq=int(entry["record"]["seq"]), text=text, prev_hash=entry["prev_hash"],
                                       hash=entry["hash"], signature=entry.get("signature", ""))  # fmt: skip
                except (ValueError, KeyError, TypeError):
                    yield chain.Stored(seq=-number, text=line, prev_hash="", hash="")


def _sink(connection: Connection) -> FileSink | None:
    sink = connection.state.get(PLUGIN_NAME)
    return sink if isinstance(sink, FileSink) else None


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return AuditFileSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    from .database import signer_from

    if not any(PLUGIN_NAME in c.enabled_plugins for c in gateway.connections):
        return
    found = gateway.settings_for(PLUGIN_NAME)
    settings = found if isinstance(found, AuditFileSettings) else AuditFileSettings()
    path = settings.path if settings.path.is_absolute() else gateway.settings.state_dir / settings.path
    try:
        signer = signer_from(settings, gateway.config_path.parent)  # type: ignore[arg-type]
        sink = FileSink(settings, path, signer)
    except (ValueError, OSError, KeyError) as exc:
        raise RuntimeError(f"audit-file: {exc}") from None
    sink.start()
    gateway.extensions[PLUGIN_NAME] = sink
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            connection.state[PLUGIN_NAME] = sink


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    sink = gateway.extensions.get(PLUGIN_NAME)
    if isinstance(sink, FileSink):
        await sink.close()


@hookimpl
def kubegate_decide(flow: Flow) -> Decision | None:
    sink = _sink(flow.connection)
    if sink is not None:
        sink.gate()
    return None


@hookimpl
async def kubegate_audit_event(event: AuditEvent, connection: Connection) -> None:
    sink = _sink(connection)
    if sink is not None:
        await sink.submit(event)
