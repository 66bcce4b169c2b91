"""The `recording` plugin: exec and attach sessions recorded as asciicast v2, port-forwards as metadata.

Enable it per connection (`connections.NAME.plugins.recording: {}`); where recordings go (a directory, the
database or an S3-compatible bucket) and who may read everyone's is gateway-wide (top-level
`plugins.recording`). Each session gets a row in `kubegate_sessions` (who, pod, command, timings, bytes,
exit status) and, for exec/attach, a recording of stdin, stdout, stderr and resizes, masked before it is
stored and written at least every second. `kubegate sessions list`,
`kubegate replay` and `/api/sessions` read them back. See docs/recording.md.

Library functions for other features (the audit walk-through): :func:`load_session`, :func:`read_cast`,
:func:`play`, :func:`list_sessions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kubegate.core.hookspecs import PROJECT

from .cast import CastError, parse_cast, play

if TYPE_CHECKING:
    from quart import Blueprint
    from sqlmodel import SQLModel

    from kubegate.core.db import Database
    from kubegate.core.flow import Flow, Frame, Session
    from kubegate.core.gateway import Gateway

    from .recorder import Recorder
    from .store import SessionRecord

# The same marker as `kubegate.core.plugins.hookimpl`, made here so that importing this package stays
# cheap: `kubegate` builds its parser with this package's `cli` module on every run, `kubegate credential`
# (run by kubectl before each request) included; the database layer is imported when first needed.
hookimpl = pluggy.HookimplMarker(PROJECT)

PLUGIN_NAME = "recording"

__all__ = [
    "PLUGIN_NAME",
    "CastError",
    "RecordingConnectionSettings",
    "RecordingMissing",
    "RecordingSettings",
    "RecordingUnavailable",
    "S3Settings",
    "list_sessions",
    "load_session",
    "parse_cast",
    "play",
    "read_cast",
]


def _config_relative(value: Path | None, info: ValidationInfo) -> Path | None:
    """A path from the config file: `~` expanded, relative to the config file's folder."""
    if value is None:
        return None
    value = value.expanduser()
    base = Path((info.context or {}).get("base_dir", "."))
    return value if value.is_absolute() else (base / value).resolve()


INLINE_SECRETS = ("access_key_id", "secret_access_key", "session_token", "aws_access_key_id",
                  "aws_secret_access_key")  # fmt: skip


def _boto3_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("boto3") is not None
    except ValueError:  # sys.modules["boto3"] is None: as good as missing
        return False


class S3Settings(BaseModel):
    """`plugins.recording.s3`: the bucket for `storage: s3` and how to reach it."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(..., min_length=1, description="The bucket recordings go to (it must exist).")
    prefix: str = Field(
        "recordings/",
        description='Key prefix: a session\'s parts are `PREFIX/SESSION_ID/NNNNNN.part`; `""` for none.',
    )
    endpoint_url: str | None = Field(
        None,
        description="The S3 API's URL for an S3-compatible store (MinIO, Ceph, R2, …); default AWS.",
    )
    region: str | None = Field(
        None, description="The region (AWS: the bucket's); default from the AWS configuration."
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto",
        description="`path` (`ENDPOINT/BUCKET/KEY`, what most self-hosted stores want), `virtual` "
        "(`BUCKET.ENDPOINT/KEY`) or `auto` (boto3's choice).",
    )
    access_key_id_file: Path | None = Field(
        None,
        description="A file holding the access key ID (with `secret_access_key_file`); without them, "
        "the standard AWS credential chain (environment, shared config, instance or task role).",
    )
    secret_access_key_file: Path | None = Field(
        None, description="A file holding the secret access key (with `access_key_id_file`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = [key for key in INLINE_SECRETS if key in data]
            if inline:
                raise ValueError(
                    f"{inline[0]}: secrets are not accepted in the config; use access_key_id_file and "
                    "secret_access_key_file, or the AWS credential chain (environment, instance role)"
                )
        return data

    @field_validator("prefix")
    @classmethod
    def _folder(cls, value: str) -> str:
        value = value.strip().lstrip("/")
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value

    _paths = field_validator("access_key_id_file", "secret_access_key_file")(_config_relative)

    @model_validator(mode="after")
    def _key_pair(self) -> S3Settings:
        if bool(self.access_key_id_file) != bool(self.secret_access_key_file):
            raise ValueError("access_key_id_file and secret_access_key_file go together")
        return self


class RecordingSettings(BaseModel):
    """Gateway-wide: top-level `plugins.recording`."""

    model_config = ConfigDict(extra="forbid")

    storage: Literal["directory", "database", "s3"] = Field(
        "directory",
        description="Where recordings go: `directory` (one `ID.cast` file per session), `database` "
        "(chunks in the gateway's database, shared by replicas) or `s3` (an S3-compatible bucket, "
        "see `s3`; needs `kubegate[s3]`).",
    )
    directory: Path | None = Field(
        None, description="The recordings folder for `storage: directory`; default `STATE_DIR/recordings`."
    )
    s3: S3Settings | None = Field(
        None, description="The bucket and how to reach it, for `storage: s3` (required then)."
    )
    readers: list[str] = Field(
        default_factory=list,
        description="Groups that may list and replay everyone's sessions through the API; "
        "everyone sees their own.",
    )
    flush_interval_seconds: float = Field(
        0.5,
        gt=0,
        le=1.0,
        description="How often open recordings are written out (a crash loses at most this).",
    )
    max_buffer_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="A recording's buffer is written early past this.",
    )

    _directory = field_validator("directory")(_config_relative)

    @model_validator(mode="after")
    def _s3_needs(self) -> RecordingSettings:
        if self.storage == "s3":
            if self.s3 is None:
                raise ValueError("storage: s3 needs an `s3` block with at least a `bucket`")
            if not _boto3_installed():
                from .storage import BOTO3_MISSING

                raise ValueError(BOTO3_MISSING)
        return self


class RecordingConnectionSettings(BaseModel):
    """Per connection: `connections.NAME.plugins.recording`."""

    model_config = ConfigDict(extra="forbid")

    record_input: bool = Field(
        True, description="Record what is typed (stdin) as `i` events, masked as one stream."
    )
    portforward: bool = Field(
        True,
        description="Record port-forwards' metadata (who, pod, ports, duration, bytes); never their data.",
    )


def recorder_of(gateway: Gateway) -> Recorder:
    from .recorder import Recorder
    from .storage import DATABASE, S3, DatabaseStorage, DirectoryStorage, S3Storage, Storage, StorageError

    recorder = gateway.extensions.get(PLUGIN_NAME)
    if recorder is None:
        settings = gateway.settings_for(PLUGIN_NAME) or RecordingSettings()
        storage: Storage
        if settings.storage == DATABASE:
            storage = DatabaseStorage(gateway.database)
        elif settings.storage == S3 and settings.s3 is not None:
            try:
                storage = S3Storage(settings.s3)
            except StorageError as exc:  # boto3 missing, a credentials file unreadable: one line at start
                from kubegate.core.config import ConfigError

                raise ConfigError(gateway.config_path, f"plugins.{PLUGIN_NAME}", str(exc)) from None
        else:
            storage = DirectoryStorage(settings.directory or gateway.settings.state_dir / "recordings")
        recorder = Recorder(
            gateway.database,
            storage,
            flush_interval=settings.flush_interval_seconds,
            max_buffer_bytes=settings.max_buffer_bytes,
        )
        gateway.extensions[PLUGIN_NAME] = recorder
    return recorder


def _enabled(gateway: Gateway) -> bool:
    return any(PLUGIN_NAME in c.enabled_plugins for c in gateway.connections)


# -- library functions (synchronous: the CLI calls them, the gateway runs them in a thread) ------------


def load_session(database: Database, session_id: str) -> SessionRecord | None:
    """The row of one session (metadata, exit status, where its recording is), or None."""
    from .storage import load_session as load

    return load(database, session_id)


def read_cast(database: Database, record: SessionRecord, settings: RecordingSettings | None = None) -> str:
    """The asciicast v2 text of a recorded session, from the directory, the database or the S3 bucket its
    row names. `settings` (gateway-wide `plugins.recording`) gives S3's endpoint and credentials: S3 rows
    need it, other rows ignore it.

    Raises :class:`RecordingMissing` (a LookupError) when it has none (port-forward), the file is gone, or
    its store cannot be read (then the subclass `RecordingUnavailable`).
    """
    from .storage import read_cast as read

    return read(database, record, settings)


def list_sessions(
    database: Database,
    *,
    user: str | None = None,
    since: float | None = None,
    connections: list[str] | None = None,
    limit: int = 200,
) -> list[SessionRecord]:
    """Sessions, newest first, filtered by user, start time (Unix) and connection names."""
    from . import store

    return database.call(
        lambda s: store.list_sessions(s, user=user, since=since, connections=connections, limit=limit)
    )


def __getattr__(name: str) -> Any:
    if name in ("RecordingMissing", "RecordingUnavailable"):
        from . import storage

        return getattr(storage, name)
    raise AttributeError(name)


# -- hooks --------------------------------------------------------------------------------------------


@hookimpl
def kubegate_gateway_settings() -> type[BaseModel]:
    return RecordingSettings


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return RecordingConnectionSettings


@hookimpl
def kubegate_database_models() -> list[type[SQLModel]]:
    from . import store

    return [store.SessionRecord, store.SessionChunk]


@hookimpl
def kubegate_http_routes(gateway: Gateway) -> Blueprint | None:
    if not _enabled(gateway):
        return None
    from .routes import make_blueprint

    settings = gateway.settings_for(PLUGIN_NAME) or RecordingSettings()
    return make_blueprint(gateway, recorder_of(gateway), PLUGIN_NAME, readers=settings.readers)


@hookimpl
async def kubegate_startup(gateway: Gateway) -> None:
    if not _enabled(gateway):
        return
    import asyncio

    from . import store  # noqa: F401 - registers the tables

    # The gateway created the tables of the models imported before it started; ours may come later.
    await asyncio.to_thread(gateway.database.create_tables)
    recorder = recorder_of(gateway)
    for connection in gateway.connections:
        if PLUGIN_NAME in connection.enabled_plugins:
            connection.state[PLUGIN_NAME] = recorder
    recorder.start()


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    recorder = gateway.extensions.get(PLUGIN_NAME)
    if recorder is not None:
        await recorder.stop()


@hookimpl
async def kubegate_session_start(flow: Flow, session: Session) -> None:
    from . import store
    from .recorder import Recording
    from .storage import Storage

    recorder: Recorder | None = flow.connection.state.get(PLUGIN_NAME)
    kind = flow.attributes.subresource
    if recorder is None or kind not in (store.EXEC, store.ATTACH, store.PORTFORWARD):
        return
    settings = flow.connection.settings_for(PLUGIN_NAME) or RecordingConnectionSettings()
    if kind == store.PORTFORWARD and not settings.portforward:
        return
    # The options as the API server decodes them (core/attributes.py), not a second reading of the query.
    attrs = flow.attributes
    identity = flow.identity
    record = store.SessionRecord(
        id=store.new_id(),
        request_id=flow.id,
        connection=flow.connection.name,
        user=identity.user if identity else "",
        groups=list(identity.groups) if identity else [],
        kind=kind,
        namespace=flow.attributes.namespace,
        pod=flow.attributes.name,
        container=attrs.container,
        command=flow.connection.hooks.record_command(flow, attrs.command),  # the row and the cast's title
        ports=",".join(str(port) for port in attrs.ports),
        tty=attrs.tty,
        subprotocol=session.subprotocol,
        started=session.started,
        kubectl_session=flow.kubectl_session,
    )
    storage: Storage | None = None
    if kind != store.PORTFORWARD:  # port-forward: the row only, never the forwarded bytes
        storage = recorder.storage
        record.storage, record.location = storage.name, storage.location(record.id)
    # Output a plugin already masked for this caller (`flow.output_masked`) is stored as relayed; other
    # output (an exempt caller's, or on a connection without masking) is masked here.
    hooks = flow.connection.hooks
    recording = Recording(
        record,
        storage,
        masked_stream=lambda: hooks.record_stream(flow),
        mask_output=not flow.output_masked,
        record_input=settings.record_input,
        max_buffer_bytes=recorder.max_buffer_bytes,
    )
    session.state[PLUGIN_NAME] = recording
    await recorder.begin(recording)


@hookimpl(trylast=True)
async def kubegate_stream_frame(flow: Flow, session: Session, frame: Frame) -> None:
    """Last of all plugins (and async, so after the others' coroutines too): what is recorded is what the
    client got — masked, with held-back output where the masking plugin released it."""
    recording = session.state.get(PLUGIN_NAME)
    if recording is None or recording.storage is None:
        return
    recording.on_frame(frame)
    await recording.relieve()


@hookimpl
async def kubegate_session_end(flow: Flow, session: Session) -> None:
    recording = session.state.get(PLUGIN_NAME)
    recorder = flow.connection.state.get(PLUGIN_NAME)
    if recording is not None and recorder is not None:
        await recorder.end(session, recording)
