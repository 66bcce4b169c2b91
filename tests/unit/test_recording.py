"""The recording plugin's parts without a cluster: the asciicast writer and player, the channel protocol
(exit status, resizes), `--since`, the recorder's masking and flushing, and both storages."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import pytest
from recordings import MaskedStream, fake_session, status_frame

from kubegate.core.db import Database
from kubegate.core.flow import Frame, FrameDirection
from kubegate.core.since import SinceError, parse_since
from kubegate.plugins.recording import (
    RecordingConnectionSettings,
    RecordingSettings,
    list_sessions,
    load_session,
    read_cast,
    store,
)
from kubegate.plugins.recording.cast import CastError, CastWriter, parse_cast, play
from kubegate.plugins.recording.frames import exit_status, parse_resize, split_frame
from kubegate.plugins.recording.recorder import Recorder, Recording
from kubegate.plugins.recording.storage import DatabaseStorage, DirectoryStorage, RecordingMissing

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = FrameDirection.CLIENT_TO_UPSTREAM, FrameDirection.UPSTREAM_TO_CLIENT


# -- asciicast writer ---------------------------------------------------------------------------------


def test_a_utf8_character_split_across_frames_comes_out_whole():
    writer = CastWriter(1700000000.0)
    euro = "€".encode()  # three bytes
    writer.output(0.1, b"price: " + euro[:1])
    writer.output(0.2, euro[1:2])
    writer.output(0.3, euro[2:] + b"5\r\n")
    writer.finish(0.4)
    cast = parse_cast(writer.take())
    assert cast.output() == "price: €5\r\n"
    assert "\ufffd" not in cast.output()


def test_invalid_utf8_becomes_the_replacement_character_and_stdout_stderr_do_not_mix_decoders():
    writer = CastWriter(0.0)
    writer.output(0.1, b"a\xc3", "stdout")  # the start of a 2-byte character on stdout …
    writer.output(0.2, b"\xa9b", "stderr")  # … is not completed by stderr's bytes
    writer.output(0.3, b"\xff\n", "stdout")
    writer.finish(0.4)
    text = parse_cast(writer.take()).output()
    assert text.count("\ufffd") == 3 and "a" in text and "b" in text


def test_a_resize_before_output_sizes_the_header_and_later_ones_are_events():
    writer = CastWriter(1700000000.0, title="t")
    writer.resize(0.0, 120, 40)
    writer.output(0.5, b"$ ")
    writer.resize(1.0, 100, 30)
    writer.resize(1.1, 100, 30)  # unchanged: no event
    writer.finish(2.0)
    cast = parse_cast(writer.take())
    assert (cast.header["width"], cast.header["height"]) == (120, 40)
    assert cast.header["version"] == 2 and cast.header["timestamp"] == 1700000000
    assert cast.header["title"] == "t" and "TERM" in cast.header["env"]
    assert cast.events == [(0.5, "o", "$ "), (1.0, "r", "100x30")]


def test_without_a_resize_the_header_says_80x24_and_an_empty_session_still_has_one():
    writer = CastWriter(0.0)
    writer.finish(1.0)
    cast = parse_cast(writer.take())
    assert (cast.header["width"], cast.header["height"]) == (80, 24) and cast.events == []


def test_times_never_go_back_and_take_empties_the_buffer():
    writer = CastWriter(0.0)
    writer.output(1.0, b"a")
    first = writer.take()
    writer.output(0.5, b"b")  # a clock step backwards
    second = writer.take()
    assert writer.take() == ""
    assert json.loads(second.splitlines()[0]) == [1.0, "o", "b"]
    assert len(first.splitlines()) == 2  # header + event


def test_parse_cast_ignores_a_last_line_cut_short_and_rejects_garbage():
    good = '{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "x"]\n[0.2, "o", "y'
    assert parse_cast(good).output() == "x"
    with pytest.raises(CastError):
        parse_cast('{"version": 1}\n')
    with pytest.raises(CastError):
        parse_cast('{"version": 2}\nnot json\n[0.1, "o", "x"]\n')


# -- player -------------------------------------------------------------------------------------------

CAST = "\n".join(
    [
        json.dumps({"version": 2, "width": 80, "height": 24}),
        json.dumps([0.5, "o", "$ "]),
        json.dumps([1.0, "i", "ls\r"]),
        json.dumps([1.5, "o", "ls\r\n"]),
        json.dumps([1.5, "r", "100x30"]),
        json.dumps([11.5, "o", "a  b\r\n"]),  # ten seconds idle
    ]
)


def test_play_keeps_the_timing_divided_by_speed_caps_idle_gaps_and_skips_input():
    slept: list[float] = []
    out = io.StringIO()
    written = play(CAST, out, speed=2, max_wait=2, sleep=slept.append)
    assert out.getvalue() == "$ ls\r\na  b\r\n"  # "ls\r" typed is not printed twice
    assert written == 3
    assert slept == [0.25, 0.5, 1.0]  # 0.5/2, 1.0/2, min(10, 2)/2


def test_play_without_a_cap_waits_the_whole_gap():
    slept: list[float] = []
    play(CAST, io.StringIO(), speed=1, max_wait=None, sleep=slept.append)
    assert slept == [0.5, 1.0, 10.0]


@pytest.mark.parametrize("speed", [0, -1])
def test_play_refuses_a_speed_that_is_not_positive(speed):
    with pytest.raises(ValueError):
        play(CAST, io.StringIO(), speed=speed, sleep=lambda _: None)


# -- channel protocol ---------------------------------------------------------------------------------


def test_exit_status_of_success_a_non_zero_code_and_a_failure_without_code():
    success = {"metadata": {}, "status": "Success"}
    assert exit_status(json.dumps(success).encode()) == (0, "")
    failure = {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    code, reason = exit_status(json.dumps(failure).encode())
    assert code == 3 and "non-zero" in reason
    internal = {"status": "Failure", "message": 'container "nope" not found', "reason": "InternalError"}
    assert exit_status(json.dumps(internal).encode()) == (None, 'container "nope" not found')
    assert exit_status(b"") == (None, "")
    # v1-v3: plain text
    assert exit_status(b"command terminated with non-zero exit code: exit code 2")[0] == 2


def test_frames_channels_base64_and_v5_close_frames():
    assert split_frame(b"\x01hello", False) == (1, b"hello")
    assert split_frame(b"\xff\x00", False) is None  # v5: the client closed stdin
    assert split_frame(b"1" + base64.b64encode(b"hi"), True) == (1, b"hi")
    assert split_frame(b"", False) is None
    assert parse_resize(b'{"Width":120,"Height":40}{"Width":100,"Height":30}') == [(120, 40), (100, 30)]
    assert parse_resize(b'{"Width":0,"Height":40}') == []


# -- --since ------------------------------------------------------------------------------------------


def test_since_durations_and_times():
    now = 1_700_000_000.0
    assert parse_since("1h", now) == now - 3600
    assert parse_since("30m", now) == now - 1800
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("45s", now) == now - 45
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20+00:00") == 1_700_000_000.0
    for bad in ("yesterday", "1y", "", "-1h"):
        with pytest.raises(SinceError):
            parse_since(bad, now)


# -- the recorder -------------------------------------------------------------------------------------


def new_record(storage, **values) -> store.SessionRecord:
    record = store.SessionRecord(id=store.new_id(), user="alice", connection="prod", namespace="prod",
                                 pod="web", command=["sh"], tty=True, started=time.time(), **values)  # fmt: skip
    record.storage, record.location = storage.name, storage.location(record.id)
    return record


def read_file(path: str) -> str:
    return Path(path).read_text() if Path(path).exists() else ""


def file_mode(path: str) -> int:
    return Path(path).stat().st_mode & 0o777


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def database(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    db.create_tables()
    yield db
    db.close()


async def test_database_storage_round_trip_in_chunks_with_exit_code_and_masked_input(database):
    storage = DatabaseStorage(database)
    recorder = Recorder(database, storage, flush_interval=0.5, max_buffer_bytes=1024)
    clock = FakeClock()
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024, clock=clock)  # fmt: skip
    await recorder.begin(recording)
    assert load_session(database, record.id) is not None  # the row exists while the session runs
    recording.on_frame(Frame(UP, b'\x04{"Width":120,"Height":40}'))
    recording.on_frame(Frame(DOWN, b"\x01"))  # the empty frame servers send first
    clock.now += 0.25
    recording.on_frame(Frame(DOWN, b"\x01$ "))
    for ch in "echo hunter2-s3cret\r":  # typed one key at a time: masked as a whole
        clock.now += 0.1
        recording.on_frame(Frame(UP, b"\x00" + ch.encode()))
    await recording.flush()
    clock.now += 1
    recording.on_frame(Frame(DOWN, b"\x01" + b"x" * 3000))  # past max_buffer_bytes: written at once
    await recording.relieve()
    assert recording.writer.pending_bytes == 0
    recording.on_frame(Frame(DOWN, b"\x02oops\r\n"))
    recording.on_frame(Frame(DOWN, status_frame(3)))
    recording.on_frame(Frame(UP, b"\xff\x00"))  # v5 close of stdin: no event
    await recorder.end(fake_session(), recording)

    saved = load_session(database, record.id)
    assert saved is not None and saved.exit_code == 3 and saved.ended is not None
    assert (saved.width, saved.height) == (120, 40) and saved.bytes_in == 10 and saved.bytes_out == 20
    assert not saved.incomplete and saved.events == 7
    chunks = database.call(lambda s: s.exec(store.select(store.SessionChunk)).all())
    assert len(chunks) == 3 and [c.seq for c in chunks] == [0, 1, 2]
    text = read_cast(database, saved)
    assert "hunter2-s3cret" not in text
    cast = parse_cast(text)
    assert (cast.header["width"], cast.header["height"]) == (120, 40)
    # Typed input is an event per frame, as far as it may be stored: `e` and `h` wait for the next key
    # (they could begin a JWT or the known value), the secret goes out masked with the Enter that ends it.
    assert [(code, data) for _, code, data in cast.events] == [
        ("o", "$ "),
        ("i", "ec"),
        ("i", "ho"),
        ("i", " "),
        ("i", "<masked>\r"),
        ("o", "x" * 3000),
        ("o", "oops\r\n"),
    ]
    assert [t for t, _, _ in cast.events[:5]] == pytest.approx([0.25, 0.45, 0.65, 0.75, 2.25])
    assert [r.id for r in list_sessions(database, user="alice")] == [record.id]
    assert list_sessions(database, user="bob") == []


async def test_output_not_masked_upstream_is_masked_here_even_split_across_frames(tmp_path, database):
    storage = DirectoryStorage(tmp_path / "rec")
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=True, record_input=False,
                          max_buffer_bytes=65536)  # fmt: skip
    recording.on_frame(Frame(DOWN, b"\x01password: hunter2-s"))
    recording.on_frame(Frame(DOWN, b"\x01" + b"3cret\r\n$ "))
    recording.on_frame(Frame(UP, b"\x00hunter2-s3cret\r"))  # record_input is off: not recorded
    await recording.flush()  # the prompt goes out at once: nothing in it can begin a secret
    text = read_file(record.location)
    assert "hunter2" not in text
    assert parse_cast(text).output() == "password: <masked>\r\n$ "
    assert all(code == "o" for _, code, _ in parse_cast(text).events)
    assert file_mode(record.location) == 0o600


async def test_a_failing_storage_never_breaks_the_session_and_marks_the_recording(database):
    class Broken(DirectoryStorage):
        def append(self, session_id, location, seq, text):
            raise OSError("disk full")

    storage = Broken(Path("/nonexistent"))
    recorder = Recorder(database, storage, flush_interval=0.5, max_buffer_bytes=1024)
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    await recorder.begin(recording)
    for _ in range(10):
        recording.on_frame(Frame(DOWN, b"\x01" + b"y" * 1000))
        await recording.relieve()
    recording.on_frame(Frame(DOWN, b"\x03" + json.dumps({"status": "Success"}).encode()))
    await recorder.end(fake_session(), recording)
    saved = load_session(database, record.id)
    assert saved is not None and saved.incomplete and saved.exit_code == 0
    assert recording.write_errors >= 1 and recorder.write_errors == recording.write_errors
    with pytest.raises(RecordingMissing):
        read_cast(database, saved)


class Slow(DirectoryStorage):
    delay = 0.2
    writes = 0

    def append(self, session_id, location, seq, text):
        time.sleep(self.delay)
        super().append(session_id, location, seq, text)
        self.writes += 1


async def test_a_storage_slower_than_the_session_slows_it_down_instead_of_growing_memory(tmp_path):
    storage = Slow(tmp_path)
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    recording.on_frame(Frame(DOWN, b"\x01" + b"z" * 1500))
    writing = asyncio.ensure_future(recording.flush())
    await asyncio.sleep(0.05)  # a write is in progress: the lock is held
    for _ in range(20):  # what the frame hook does
        recording.on_frame(Frame(DOWN, b"\x01" + b"z" * 1000))
        await recording.relieve()
        assert recording.writer.pending_bytes <= 2 * 1024 + 1100
    await writing
    await recording.flush()
    assert not record.incomplete and recording.dropped_bytes == 0
    assert parse_cast(read_file(record.location)).output() == "z" * (1500 + 20 * 1000)


async def test_a_stalled_storage_costs_the_recording_its_buffer_never_the_session(tmp_path):
    storage = Slow(tmp_path)
    storage.delay = 1.0
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=1024)  # fmt: skip
    recording.stall_seconds = 0.1
    recording.on_frame(Frame(DOWN, b"\x01" + b"z" * 1500))
    writing = asyncio.ensure_future(recording.flush())
    await asyncio.sleep(0.05)
    for _ in range(5):
        recording.on_frame(Frame(DOWN, b"\x01" + b"z" * 1000))
        await recording.relieve()  # returns after stall_seconds at most
    assert record.incomplete and recording.dropped_bytes > 0
    await writing


async def test_the_flusher_writes_open_recordings_without_the_session_doing_anything(tmp_path, database):
    storage = DirectoryStorage(tmp_path / "rec")
    recorder = Recorder(database, storage, flush_interval=0.05, max_buffer_bytes=65536)
    record = new_record(storage)
    recording = Recording(record, storage, masked_stream=MaskedStream, mask_output=False, record_input=True,
                          max_buffer_bytes=65536)  # fmt: skip
    await recorder.begin(recording)
    recorder.start()
    try:
        recording.on_frame(Frame(DOWN, b"\x01still running\r\n"))
        for _ in range(100):
            if "still running" in read_file(record.location):
                break
            await asyncio.sleep(0.05)
        assert "still running" in read_file(record.location)
    finally:
        await recorder.stop()


# -- settings and docs --------------------------------------------------------------------------------


def test_every_recording_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for model in (RecordingSettings, RecordingConnectionSettings):
        for field in model.model_fields:
            assert f"`{field}`" in doc, f"docs/configuration.md lacks {model.__name__}.{field}"


def test_the_directory_is_relative_to_the_config_file(tmp_path):
    settings = RecordingSettings.model_validate({"directory": "recs"}, context={"base_dir": tmp_path})
    assert settings.directory == (tmp_path / "recs").resolve()
    with pytest.raises(ValueError):
        RecordingSettings.model_validate({"storage": "s3"})
    with pytest.raises(ValueError):
        RecordingConnectionSettings.model_validate({"record_stdin": True})


# -- CLI errors ---------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "state", "connections": {"prod": {"upstream": {}}}}))
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["sessions", "list", "--since", "yesterday"], "since 'yesterday'"),
        (["replay", "s-nope"], "no session s-nope"),
        (["replay", "s-nope", "--speed", "0"], "--speed must be greater than 0"),
        (["replay", "s-nope", "--speed", "fast"], "--speed must be a number"),
        (["replay", "s-nope", "--max-wait", "-1"], "--max-wait must be 0 or more"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(config, capsys, args, message):
    from kubegate.core.cli import main

    assert main([*args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kubegate: error: ") and message in err and err.count("\n") == 1


def test_sessions_list_of_an_empty_database(config, capsys):
    from kubegate.core.cli import main

    assert main(["sessions", "list", "--config", str(config), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_sessions_command_line_cannot_drive_the_terminal_it_is_listed_on(tmp_path, capsys):
    # The exec argv is the caller's (any bytes but NUL): a CR and "erase line" redrew the listed command.
    import yaml

    from kubegate.core.cli import main

    config = tmp_path / "kubegate.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'gw.db'}"},
                                      "connections": {"prod": {"upstream": {}}}}))  # fmt: skip
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.create_tables()
    storage = DatabaseStorage(db)
    record = new_record(storage)
    record.command = ["sh", "-c", "curl evil; : '\r\x1b[2Kdate'", "\u202e"]
    db.call(lambda s: store.add(s, record))
    db.close()
    assert main(["sessions", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\r\x1b\u202e"), out
    assert "sh -c 'curl evil; : '\"'\"'\\x0d\\x1b[2Kdate'\"'\"'' '\\u202e'" in out
