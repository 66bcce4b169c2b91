"""Where recordings go: a directory of ``ID.cast`` files (the default), the gateway's database, or an
S3-compatible object store.

Writers are synchronous and run in a worker thread (the recorder calls them through
``asyncio.to_thread``): each call appends one batch of asciicast lines, so a recording grows as the
session runs and a crash loses only the batch not yet written. Another store is one more class with the
same three methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubegate.core.db import Database

from . import store

if TYPE_CHECKING:
    from . import RecordingSettings, S3Settings

DIRECTORY, DATABASE, S3 = "directory", "database", "s3"
PART = ".part"  # S3: PREFIX/ID/000000.part, 000001.part, … one object per batch
BOTO3_MISSING = "storage: s3 needs boto3, which is not installed: pip install 'kubegate[s3]'"


class RecordingMissing(LookupError):
    """The session has no recording (port-forward), or its file is gone."""


class RecordingUnavailable(RecordingMissing):
    """The recording's store cannot be read now (network, credentials, missing settings)."""


class StorageError(Exception):
    """A store that cannot be set up (boto3 missing, an unreadable credentials file): one line."""


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


class S3Storage:
    """``s3://BUCKET/PREFIX/ID/NNNNNN.part``: S3 has no append, so each batch is an object of its own, named
    by its sequence number; reading lists the session's parts and joins them in order. Works with any
    S3-compatible store (MinIO, Ceph, R2, …) through `endpoint_url`. The boto3 client is thread-safe and
    shared by the worker threads that write."""

    name = S3

    def __init__(self, settings: S3Settings, *, client: Any = None) -> None:
        self.bucket, self.prefix = settings.bucket, settings.prefix
        self.client = client if client is not None else s3_client(settings)

    def location(self, session_id: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{session_id}/"

    def append(self, session_id: str, location: str, seq: int, text: str) -> None:
        bucket, folder = split_location(location)
        self.client.put_object(
            Bucket=bucket,
            Key=f"{folder}{seq:06d}{PART}",
            Body=text.encode("utf-8"),
            ContentType="text/plain; charset=utf-8",
        )

    def parts(self, location: str) -> list[str]:
        """The keys of a recording's parts, in sequence order."""
        bucket, folder = split_location(location)
        found: list[tuple[int, str]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for item in page.get("Contents", []):
                seq = item["Key"][len(folder) :].removesuffix(PART)
                if item["Key"].endswith(PART) and seq.isdigit():
                    found.append((int(seq), item["Key"]))
        return [key for _, key in sorted(found)]

    def read(self, record: store.SessionRecord) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = split_location(record.location)
        try:
            texts = [
                self.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", "replace")
                for key in self.parts(record.location)
            ]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise RecordingMissing(f"the recording of {record.id} is gone: no bucket {bucket}") from None
            raise RecordingUnavailable(
                f"cannot read the recording of {record.id} ({record.location}): {exc}"
            ) from None
        except BotoCoreError as exc:
            raise RecordingUnavailable(
                f"cannot read the recording of {record.id} ({record.location}): {exc}"
            ) from None
        return "".join(texts)


def split_location(location: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX/ID/`` → (BUCKET, ``PREFIX/ID/``)."""
    bucket, _, folder = location.removeprefix("s3://").partition("/")
    return bucket, folder


def _read_secret(path: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StorageError(f"s3.{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise StorageError(f"s3.{key}: {path} is empty")
    return value


def s3_client(settings: S3Settings) -> Any:
    """A boto3 S3 client for the settings: keys from the `*_file` pair when given, otherwise the standard
    AWS credential chain (environment, shared config, web identity, instance or task role)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError(BOTO3_MISSING) from None
    keys: dict[str, str] = {}
    if settings.access_key_id_file and settings.secret_access_key_file:
        keys["aws_access_key_id"] = _read_secret(settings.access_key_id_file, "access_key_id_file")
        keys["aws_secret_access_key"] = _read_secret(
            settings.secret_access_key_file, "secret_access_key_file"
        )
    session = boto3.session.Session(region_name=settings.region, **keys)
    config = Config(
        connect_timeout=5,
        read_timeout=15,
        retries={"mode": "standard", "total_max_attempts": 3},
        s3={"addressing_style": settings.addressing_style},
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def read_cast(
    database: Database, record: store.SessionRecord, settings: RecordingSettings | None = None
) -> str:
    """The asciicast of a recorded session, from wherever its row says it is (synchronous).

    `settings` (the gateway-wide `plugins.recording`) is needed for S3 rows only: the row names the bucket
    and the objects, the settings the endpoint and the credentials.

    Raises :class:`RecordingMissing` for a session without a recording (port-forward) or whose file is gone,
    :class:`RecordingUnavailable` (a RecordingMissing too) when its store cannot be read now.
    """
    if record.storage == DATABASE:
        text = DatabaseStorage(database).read(record)
    elif record.storage == DIRECTORY:
        text = DirectoryStorage(Path(record.location).parent).read(record)
    elif record.storage == S3:
        s3 = settings.s3 if settings is not None else None
        if s3 is None:
            raise RecordingUnavailable(
                f"the recording of {record.id} is in S3 ({record.location}): reading it needs the "
                "gateway's `plugins.recording.s3` settings"
            )
        try:
            text = S3Storage(s3).read(record)
        except StorageError as exc:
            raise RecordingUnavailable(f"cannot read the recording of {record.id}: {exc}") from None
    else:
        raise RecordingMissing(f"session {record.id} ({record.kind}) has no recording, only its metadata")
    if not text:
        raise RecordingMissing(f"the recording of {record.id} is empty (nothing written yet)")
    return text


def load_session(database: Database, session_id: str) -> store.SessionRecord | None:
    """The row of one session, or None (synchronous)."""
    return database.call(lambda s: store.get(s, session_id))
