"""`storage: s3` against a real S3 API: moto's server, in-process on a loopback port (no network, no AWS).

The store itself (one object per batch, read back in order), the recorder writing a session to it, replay
through `read_cast` and `kubegate replay`, failures that must not reach the session, and the settings."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer
from recordings import MaskedStream, fake_session, status_frame

from kubegate.core.config import ConfigError
from kubegate.core.db import Database, default_url
from kubegate.core.flow import Frame, FrameDirection
from kubegate.plugins.recording import (
    RecordingSettings,
    RecordingUnavailable,
    S3Settings,
    load_session,
    read_cast,
    recorder_of,
    store,
)
from kubegate.plugins.recording.cast import parse_cast
from kubegate.plugins.recording.recorder import Recorder, Recording
from kubegate.plugins.recording.storage import (
    BOTO3_MISSING,
    RecordingMissing,
    S3Storage,
    StorageError,
    s3_client,
)

UP, DOWN = FrameDirection.CLIENT_TO_UPSTREAM, FrameDirection.UPSTREAM_TO_CLIENT
REGION = "us-east-1"


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Credentials from the environment (the standard chain), and nothing from this machine's AWS setup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(endpoint) -> str:
    name = f"kubegate-{uuid.uuid4().hex[:12]}"
    admin = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    admin.create_bucket(Bucket=name)
    return name


def s3_settings(endpoint: str, bucket: str, **values) -> S3Settings:
    return S3Settings(bucket=bucket, endpoint_url=endpoint, region=REGION, addressing_style="path", **values)


def keys_in(endpoint: str, bucket: str) -> list[str]:
    admin = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    return [item["Key"] for item in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]


def new_record(storage, **values) -> store.SessionRecord:
    record = store.SessionRecord(id=store.new_id(), user="alice", connection="prod", namespace="prod",
                                 pod="web", command=["sh"], tty=True, started=time.time(), **values)  # fmt: skip
    record.storage, record.location = storage.name, storage.location(record.id)
    return record


def fake_gateway(settings: RecordingSettings, database: Database, tmp_path: Path) -> SimpleNamespace:
    """What `recorder_of` reads of a gateway."""
    return SimpleNamespace(
        extensions={},
        settings_for=lambda name: settings,
        database=database,
        settings=SimpleNamespace(state_dir=tmp_path),
        config_path=tmp_path / "k.yaml",
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def database(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    db.create_tables()
    yield db
    db.close()


# -- the store ----------------------------------------------------------------------------------------


def test_batches_are_objects_of_their_own_and_read_back_in_order(endpoint, bucket):
    storage = S3Storage(s3_settings(endpoint, bucket))
    record = new_record(storage)
    assert record.location == f"s3://{bucket}/recordings/{record.id}/"
    batches = [f'[{i}.5, "o", "batch {i} — ü\\r\\n"]\n' for i in range(12)]  # > 10: 2 sorts before 10 only
    for seq, text in enumerate(batches):  # when the names are padded
        storage.append(record.id, record.location, seq, text)
    assert keys_in(endpoint, bucket) == [f"recordings/{record.id}/{seq:06d}.part" for seq in range(12)]
    assert storage.read(record) == "".join(batches)
    # Past six digits the names get longer: the order is numeric, not the listing's.
    storage.append(record.id, record.location, 1_000_000, "last\n")
    storage.append(record.id, record.location, 999_999, "before last\n")
    assert storage.read(record).endswith("before last\nlast\n")


def test_other_sessions_and_foreign_objects_under_the_prefix_are_not_read(endpoint, bucket):
    storage = S3Storage(s3_settings(endpoint, bucket, prefix="/team-a/recs"))
    one, two = new_record(storage), new_record(storage)
    assert one.location == f"s3://{bucket}/team-a/recs/{one.id}/"
    storage.append(one.id, one.location, 0, "one\n")
    storage.append(two.id, two.location, 0, "two\n")
    admin = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    admin.put_object(Bucket=bucket, Key=f"team-a/recs/{one.id}/notes.txt", Body=b"not a part")
    assert storage.read(one) == "one\n" and storage.read(two) == "two\n"
    nothing = new_record(storage)
    assert storage.read(nothing) == ""


def test_keys_from_files_instead_of_the_environment(endpoint, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "key-id").write_text("file-key-id\n")
    (tmp_path / "secret").write_text("file-secret\n")
    raw = {"bucket": bucket, "endpoint_url": endpoint, "region": REGION, "addressing_style": "path",
           "access_key_id_file": "key-id", "secret_access_key_file": "secret"}  # fmt: skip
    settings = S3Settings.model_validate(raw, context={"base_dir": tmp_path})
    assert settings.access_key_id_file == (tmp_path / "key-id").resolve()
    storage = S3Storage(settings)
    record = new_record(storage)
    storage.append(record.id, record.location, 0, "with keys from files\n")
    assert storage.read(record) == "with keys from files\n"
    # Without the files (and nothing in the environment) there are no credentials at all: the files were
    # what signed the requests above.
    keyless = S3Storage(s3_settings(endpoint, bucket))
    with pytest.raises(Exception, match="credentials"):
        keyless.append(record.id, record.location, 1, "unsigned\n")


def test_an_unreadable_key_file_is_one_line(tmp_path, endpoint):
    settings = s3_settings(endpoint, "b", access_key_id_file=tmp_path / "missing",
                           secret_access_key_file=tmp_path / "missing-too")  # fmt: skip
    with pytest.raises(StorageError) as caught:
        s3_client(settings)
    assert "access_key_id_file" in str(caught.value) and "\n" not in str(caught.value)


# -- the recorder, end to end -------------------------------------------------------------------------


async def test_a_session_recorded_to_s3_replays_from_its_row(endpoint, bucket, database, tmp_path):
    settings = RecordingSettings(storage="s3", s3=s3_settings(endpoint, bucket), max_buffer_bytes=1024)
    gateway = fake_gateway(settings, database, tmp_path)
    recorder = recorder_of(gateway)  # the storage the plugin picks for these settings
    assert isinstance(recorder.storage, S3Storage)
    record = new_record(recorder.storage)
    recording = Recording(record, recorder.storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    await recorder.begin(recording)
    recording.on_frame(Frame(UP, b'\x04{"Width":120,"Height":40}'))
    for i in range(12):  # one flush tick each: twelve parts, plus the last one at the end
        recording.on_frame(Frame(DOWN, f"\x01line {i}\r\n".encode()))
        await recording.flush()
    recording.on_frame(Frame(UP, b"\x00echo hunter2-s3cret\r"))
    recording.on_frame(Frame(DOWN, status_frame(3)))
    await recorder.end(fake_session(), recording)

    saved = load_session(database, record.id)
    assert saved is not None and saved.storage == "s3" and saved.location == record.location
    assert not saved.incomplete and saved.exit_code == 3 and saved.events == 13
    assert len(keys_in(endpoint, bucket)) == 13
    text = read_cast(database, saved, settings)
    assert "hunter2-s3cret" not in text
    cast = parse_cast(text)
    assert (cast.header["width"], cast.header["height"]) == (120, 40)
    assert cast.output() == "".join(f"line {i}\r\n" for i in range(12))
    assert cast.events[-1][1:] == ("i", "echo <masked>\r")
    # Without the gateway's settings, an S3 row cannot be read: said in one line, not a traceback.
    with pytest.raises(RecordingUnavailable, match=r"plugins\.recording\.s3"):
        read_cast(database, saved)


@pytest.mark.parametrize("failure", ["unreachable endpoint", "no such bucket"])
async def test_a_failing_s3_marks_the_recording_incomplete_and_the_session_goes_on(
    failure, endpoint, database, caplog
):
    if failure == "unreachable endpoint":
        settings = s3_settings(f"http://127.0.0.1:{closed_port()}", "kubegate-nowhere")
    else:
        settings = s3_settings(endpoint, f"kubegate-never-made-{uuid.uuid4().hex[:8]}")
    storage = S3Storage(settings)
    recorder = Recorder(database, storage, flush_interval=0.5, max_buffer_bytes=1024)
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    await recorder.begin(recording)
    with caplog.at_level(logging.WARNING, logger="kubegate.recording"):
        for _ in range(3):
            recording.on_frame(Frame(DOWN, b"\x01" + b"y" * 1500))
            await recording.relieve()  # no exception reaches the frame hook
        recording.on_frame(Frame(DOWN, b"\x03" + json.dumps({"status": "Success"}).encode()))
        await recorder.end(fake_session(), recording)
    saved = load_session(database, record.id)
    assert saved is not None and saved.incomplete and saved.exit_code == 0 and saved.ended is not None
    assert recording.write_errors >= 1 and recorder.write_errors == recording.write_errors
    assert f"recording {record.id}: write 0 failed" in caplog.text
    with pytest.raises(RecordingMissing) as caught:  # RecordingUnavailable or "gone": both one line
        read_cast(database, saved, RecordingSettings(storage="s3", s3=settings))
    assert record.id in str(caught.value) and "\n" not in str(caught.value)


# -- kubegate replay ----------------------------------------------------------------------------------


def write_config(tmp_path: Path, recording: dict | None) -> Path:
    config = {"state_dir": "state", "connections": {"prod": {"upstream": {}}}}
    if recording is not None:
        config["plugins"] = {"recording": recording}
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_kubegate_replay_reads_an_s3_recording_with_the_configs_settings(
    endpoint, bucket, tmp_path, capsys, monkeypatch
):
    from kubegate.core.cli import main

    (tmp_path / "key-id").write_text("file-key-id")
    (tmp_path / "secret").write_text("file-secret")
    s3 = {"bucket": bucket, "endpoint_url": endpoint, "region": REGION, "addressing_style": "path",
          "access_key_id_file": "key-id", "secret_access_key_file": "secret"}  # fmt: skip
    config = write_config(tmp_path, {"storage": "s3", "s3": s3})
    (tmp_path / "state").mkdir()
    database = Database(default_url(tmp_path / "state"))
    database.create_tables()
    storage = S3Storage(S3Settings.model_validate(s3, context={"base_dir": tmp_path}))
    recorder = Recorder(database, storage, flush_interval=0.5, max_buffer_bytes=1024)
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    await recorder.begin(recording)
    recording.on_frame(Frame(DOWN, b"\x01hello from s3\r\n"))
    await recording.flush()
    await recorder.end(fake_session(), recording)
    database.close()

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # the CLI signs with the files the config names
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["replay", record.id, "--export", "-", "--config", str(config)]) == 0
    assert parse_cast(capsys.readouterr().out).output() == "hello from s3\r\n"

    # The same row with a config that lost its s3 block: one line, exit 2.
    write_config(tmp_path, None)
    assert main(["replay", record.id, "--export", "-", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kubegate: error: ") and "plugins.recording.s3" in err and err.count("\n") == 1


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"storage": "s3"}, "needs an `s3` block"),
        ({"storage": "s3", "s3": {}}, "Field required"),
        ({"storage": "s3", "s3": {"bucket": ""}}, "at least 1 character"),
        ({"s3": {"bucket": "b", "secret_access_key": "inline!"}}, "use access_key_id_file"),
        ({"s3": {"bucket": "b", "access_key_id": "AKIA"}}, "secrets are not accepted"),
        ({"s3": {"bucket": "b", "access_key_id_file": "id"}}, "go together"),
        ({"s3": {"bucket": "b", "endpoint_url": "minio:9000"}}, "http:// or https://"),
        ({"s3": {"bucket": "b", "addressing_style": "dns"}}, "'auto', 'path' or 'virtual'"),
        ({"s3": {"bucket": "b", "acl": "public-read"}}, "Extra inputs"),
    ],
)
def test_bad_s3_settings_are_refused_at_load(raw, message):
    with pytest.raises(ValueError, match=message):
        RecordingSettings.model_validate(raw)


def test_a_missing_bucket_is_one_line_naming_the_key(tmp_path, capsys):
    from kubegate.core.cli import main

    config = write_config(tmp_path, {"storage": "s3", "s3": {"endpoint_url": "http://127.0.0.1:9"}})
    database = Database(default_url(tmp_path / "state"))  # a row in S3, so that replay reads the settings
    database.create_tables()
    database.call(
        lambda s: store.add(s, store.SessionRecord(id="s-1", storage="s3", location="s3://b/r/s-1/"))
    )
    database.close()
    assert main(["replay", "s-1", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"kubegate: error: {config}: plugins.recording.s3.bucket: required key is missing\n"


def test_the_prefix_is_a_folder_and_the_defaults(endpoint):
    assert S3Settings(bucket="b").prefix == "recordings/"
    assert S3Settings(bucket="b", prefix="/a/b").prefix == "a/b/"
    assert S3Settings(bucket="b", prefix="").prefix == ""
    storage = S3Storage(S3Settings(bucket="b", prefix=""), client=object())
    assert storage.location("s-1") == "s3://b/s-1/"
    defaults = S3Settings(bucket="b")
    assert defaults.endpoint_url is None and defaults.access_key_id_file is None
    assert RecordingSettings().storage == "directory" and RecordingSettings().s3 is None


def test_without_boto3_storage_s3_is_refused_in_one_line(monkeypatch, tmp_path, database):
    settings = RecordingSettings(storage="s3", s3=S3Settings(bucket="b"))  # validated while boto3 is there
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'kubegate\[s3\]'"):
        RecordingSettings.model_validate({"storage": "s3", "s3": {"bucket": "b"}})
    with pytest.raises(StorageError, match="boto3"):
        s3_client(S3Settings(bucket="b"))
    gateway = fake_gateway(settings, database, tmp_path)
    with pytest.raises(ConfigError) as caught:
        recorder_of(gateway)
    assert str(caught.value) == f"{tmp_path / 'k.yaml'}: plugins.recording: {BOTO3_MISSING}"
