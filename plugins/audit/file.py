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
from typing import TYPE_CHECKING, Any

from pydantic import Field

from . import chain
from .sink import SigningSettings, SinkPlugin, SinkSettings, SinkWriter

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "audit-file"


class AuditFileSettings(SinkSettings, SigningSettings):
    path: Path = Field(Path("audit/kubegate-audit.jsonl"), description="The file (relative: to `state_dir`).")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate when the file passes this size.")
    keep: int = Field(10, ge=1, le=10_000, description="Rotated files kept (`FILE.1` newest … `FILE.N`).")


class FileSink(SinkWriter):
    name = "audit-file"

    def __init__(self, settings: AuditFileSettings, path: Path, signer: chain.Signer | None):
        super().__init__(settings)
        self.file_settings, self.path, self.signer = settings, path, signer
        self.seq, self.prev = last_link(path)
        self._left = _file_state(path)  # the file as this sink left it (inode, size, mtime); None: absent

    def write(self, batch: list[dict[str, Any]]) -> None:
        # After a config reload two sinks of this file may live side by side for a while (the old one
        # finishing its requests): each write continues from the file's own last line, under one lock. The
        # line is read again only when the file is not as this sink left it, or was rotated away (reading it
        # for every batch cost more CPU than the batch: up to 1 MB read and split each time).
        with _lock_for(self.path):
            if self._left is None or _file_state(self.path) != self._left:
                self.seq, self.prev = last_link(self.path)
            self._append(batch)
            self._left = _file_state(self.path)

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


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def last_link(path: Path) -> tuple[int, str]:
    """(seq, hash) of the last line of the current file, or of the newest rotated one."""
    for candidate in (path, path.with_name(f"{path.name}.1")):
        line = _last_line(candidate)
        if line:
            try:
                entry = json.loads(line.decode())
                return int(entry["record"]["seq"]), str(entry["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{candidate}: its last line is not an audit record ({type(exc).__name__}: {exc}), so the "
                    "chain cannot go on from it; a write cut short leaves such a line: check the file, then "
                    "move it aside"
                ) from None
    return 0, chain.GENESIS


def _last_line(path: Path, block: int = 1 << 20) -> bytes:
    """The file's last non-empty line, however long: read back from the end a block at a time until the
    line's start. (Reading only the last megabyte misread a longer line, and the gateway then refused to
    start. A refused request's record made one, before caller-chosen text was bounded: a User-Agent of
    600,000 double quotes is a head the API server reads, and JSON wrote it as 1.2 MB.)"""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            parts: list[bytes] = []  # the line's pieces, last first
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start)
                end = start
                if not parts:
                    chunk = chunk.rstrip(b"\r\n")  # the newline that ends the last line
                    if not chunk:
                        continue
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    parts.append(chunk[newline + 1 :])
                    break
                parts.append(chunk)
            return b"".join(reversed(parts))
    except OSError:
        return b""


def stored_from_files(paths: list[Path]) -> Any:
    """The chain records of the files, oldest first (give rotated files oldest first: F.2 F.1 F).

    Each record's text is the literal text of the line, not the parsed record written again: a duplicate key
    (which a reader that keeps the first occurrence takes for the record), a space or an escape must not
    pass as intact because parsing and writing again happens to restore the hashed text. A line must be
    exactly as `FileSink` writes it; any other shape is yielded with the reason, which `verify` reports as
    "modified"."""
    for path in paths:
        with open(path, encoding="utf-8", newline="\n") as f:
            for number, line in enumerate(f, 1):
                yield _stored_from_line(line.removesuffix("\n"), f"{path} line {number}", number)


_LINE_KEYS = ["hash", "prev_hash", "record", "signature"]  # as `FileSink._append` writes them, in order


def _stored_from_line(line: str, where: str, number: int) -> chain.Stored:
    try:
        pairs = json.loads(line, object_pairs_hook=lambda pairs: pairs)  # every key, duplicates too
        entry = dict(pairs)
        seq = int(dict(entry["record"])["seq"])
    except (ValueError, KeyError, TypeError):
        return chain.Stored(seq=-number, text=line, prev_hash="", hash="",
                            malformed=f"{where} is not an audit record")  # fmt: skip
    if [key for key, _ in pairs] != _LINE_KEYS:
        return chain.Stored(seq=seq, text="", prev_hash="", hash="",
                            malformed=f"{where} has other keys than hash, prev_hash, record, signature, "
                            "or one twice")  # fmt: skip
    chain_hash, prev_hash, signature = (str(entry[key]) for key in ("hash", "prev_hash", "signature"))
    head = f'{{"hash":"{chain_hash}","prev_hash":"{prev_hash}","record":'  # as `FileSink._append` writes
    tail = f',"signature":"{signature}"}}'
    if not (line.startswith(head) and line.endswith(tail)):
        return chain.Stored(seq=seq, text="", prev_hash="", hash="",
                            malformed=f"{where} is not written as the sink writes it (a space or an escape)")  # fmt: skip
    # The record's text as it stands in the file: `verify` hashes it and checks that it is canonical.
    text = line[len(head) : len(line) - len(tail)]
    return chain.Stored(seq=seq, text=text, prev_hash=prev_hash, hash=chain_hash, signature=signature)


def make_sink(gateway: Gateway, settings: AuditFileSettings | None) -> FileSink:
    settings = settings or AuditFileSettings()
    path = settings.path if settings.path.is_absolute() else gateway.settings.state_dir / settings.path
    try:
        return FileSink(settings, path, settings.signer(gateway.config_path.parent))
    except KeyError as exc:
        raise ValueError(f"the last line of {path} is not an audit record ({exc})") from None


PLUGIN = SinkPlugin(PLUGIN_NAME, __name__, AuditFileSettings, make_sink)
