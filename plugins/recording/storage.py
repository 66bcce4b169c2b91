"""Where recordings go: a directory of ``ID.cast`` files (the default) or the gateway's database.

Writers are synchronous and run in a worker thread (the recorder calls them through
``asyncio.to_thread``): each call appends one batch of asciicast lines, so a recording grows as the
session runs and a crash loses only the batch not yet written. Another store (S3-compatible, say) is one
more class with the same three methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from kubegate.core.db import Database

from . import store

DIRECTORY, DATABASE = "directory", "database"


class RecordingMissing(LookupError):
    """The session has no recording (port-forward), or its file is gone."""


class Storage(Protocol):
    name: str

    def location(self, session_id: str) -> str:
        """Where the recording of `session_id` will be (stored in its row)."""
        ...

    def append(self, session_id: str, location: str, seq: int, text: str) -> None:
        """Add the `seq`-th batch of lines to a recording (seq counts from 0)."""
        ...

    def read(self, record: store.SessionRecord) -> str: ...


class DirectoryStorage:
    """``DIR/ID.cast``, readable by the gateway's user only (recordings show what people did)."""

    name = DIRECTORY

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def location(self, session_id: str) -> str:
        return str((self.directory / f"{session_id}.cast").resolve())

    def append(self, session_id: str, location: str, seq: int, text: str) -> None:
        path = Path(location)
        if seq == 0:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)

    def read(self, record: store.SessionRecord) -> str:
        try:
            return Path(record.location).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecordingMissing(f"the recording of {record.id} is gone: {record.location}") from None


class DatabaseStorage:
    """Numbered chunks in ``kubegate_session_chunks``: nothing to mount, shared by replicas."""

    name = DATABASE

    def __init__(self, database: Database) -> None:
        self.database = database

    def location(self, session_id: str) -> str:
        return DATABASE

    def append(self, session_id: str, location: str, seq: int, text: str) -> None:
        self.database.call(lambda s: store.append_chunk(s, session_id, seq, text))

    def read(self, record: store.SessionRecord) -> str:
        return self.database.call(lambda s: store.read_chunks(s, record.id))


def read_cast(database: Database, record: store.SessionRecord) -> str:
    """The asciicast of a recorded session, from wherever its row says it is (synchronous).

    Raises :class:`RecordingMissing` for a session without a recording (port-forward) or whose file is gone.
    """
    if record.storage == DATABASE:
        text = DatabaseStorage(database).read(record)
    elif record.storage == DIRECTORY:
        text = DirectoryStorage(Path(record.location).parent).read(record)
    else:
        raise RecordingMissing(f"session {record.id} ({record.kind}) has no recording, only its metadata")
    if not text:
        raise RecordingMissing(f"the recording of {record.id} is empty (nothing written yet)")
    return text


def load_session(database: Database, session_id: str) -> store.SessionRecord | None:
    """The row of one session, or None (synchronous)."""
    return database.call(lambda s: store.get(s, session_id))
