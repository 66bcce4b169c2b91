"""A recording keeps no secret in clear wherever its streams are cut: typed input (keystrokes, a paste, lines
of any length) and output no plugin masked for the client (an exempt caller's, a connection without
masking; frames of any size, no newline for kilobytes, flush ticks between any two frames) are masked by a
stream masker each (`kubegate_record_stream`), so a secret at any offset is stored exactly as one pass over
the whole text would mask it; what is still held when the session ends is masked, a secret in progress
hidden; a match open at the bound is the marker, never a prefix.

The red team's cases (2026-12-08): a private key pasted into `kubectl exec -it` (CR newlines) or typed line
by line was stored in clear in the `i` events; the recorder's own cuts (1 KiB of typed input, 4 KiB of
output without a newline, output held at a flush tick) left a secret across them whole in neither piece."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recordings import fake_session

from kubegate.core.flow import Frame, FrameDirection
from kubegate.plugins.masking import Masking, MaskingSettings
from kubegate.plugins.masking.stream import StreamMasker
from kubegate.plugins.recording import store
from kubegate.plugins.recording.cast import parse_cast
from kubegate.plugins.recording.recorder import Recording
from kubegate.plugins.recording.storage import DirectoryStorage

UP, DOWN = FrameDirection.CLIENT_TO_UPSTREAM, FrameDirection.UPSTREAM_TO_CLIENT
MARKER = "<masked by kubegate>"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA7bqXyZ1N2k3Qw9LmT4pR8sV0uYcD6fGhJ2kL5mN7oP9qR1sT\n"
    "3uV5wX7yZ9aB1cD3eF5gH7iJ9kL1mN3oP5qR7sT9uV1wX3yZ5aB7cD9eF1gH3iJ\n"
    "-----END RSA PRIVATE KEY-----"
)
BODY_LINE = PEM.split("\n")[1]
SPACED = "Correct Horse Battery Staple"
GITHUB = "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa"  # a default detector's
ASSIGNED = "S3cr3tV4lu3Q"
MASKING = Masking(MaskingSettings())
MASKING.set_known({PEM, SPACED})
# (what is typed or printed, the part that must never be stored)
SECRETS = [
    (SPACED, SPACED),
    (PEM, BODY_LINE),
    (PEM.replace("\n", "\r"), BODY_LINE),  # pasted on a terminal, or typed line by line
    (PEM.replace("\n", "\r\n"), BODY_LINE),  # printed on a terminal
    (GITHUB, GITHUB),
    (f"password: {ASSIGNED}", ASSIGNED),
    (f"export DB_TOKEN={ASSIGNED}", ASSIGNED),
]
# Filler that can begin none of the secrets, with no line end: one line across the recorder's old cuts.
FILLER = "bf 12.z"


class Recorded:
    """A recording of one exec session on a directory, its frames fed as the recording hook feeds them."""

    def __init__(self, tmp_path: Path, *, mask_output: bool = True):
        storage = DirectoryStorage(tmp_path / "rec")
        record = store.SessionRecord(id=store.new_id(), user="alice", connection="prod", namespace="prod",
                                     pod="web", command=["sh"], tty=True, started=0.0)  # fmt: skip
        record.storage, record.location = storage.name, storage.location(record.id)
        self.recording = Recording(record, storage, masked_stream=masked_stream, mask_output=mask_output,
                                   record_input=True, max_buffer_bytes=1 << 20)  # fmt: skip

    def typed(self, data: bytes) -> None:
        self.recording.on_frame(Frame(UP, b"\x00" + data))

    def printed(self, data: bytes) -> None:
        self.recording.on_frame(Frame(DOWN, b"\x01" + data))

    async def tick(self) -> None:
        await self.recording.flush()  # what the flusher does every flush_interval_seconds

    def stored(self) -> str:
        """The asciicast as written so far."""
        return Path(self.recording.record.location).read_text()

    async def end(self) -> tuple[str, str]:
        """The session ends: (the typed input stored, the output stored)."""
        await self.recording.finish(fake_session())
        cast = parse_cast(self.stored())
        return "".join(data for _, code, data in cast.events if code == "i"), cast.output()


class MaskedStream:
    """What the masking plugin's `kubegate_record_stream` gives the recorder, without a flow."""

    def __init__(self) -> None:
        self.stream = StreamMasker(MASKING.text, MASKING.settings.max_secret_bytes)

    def feed(self, chunk: bytes) -> bytes:
        return self.stream.feed(chunk)

    def end(self) -> bytes:
        return self.stream.close()


def masked_stream() -> MaskedStream:
    return MaskedStream()


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, position, index = [], 0, 0
    while position < len(data):
        chunks.append(data[position : position + sizes[index % len(sizes)]])
        position, index = position + sizes[index % len(sizes)], index + 1
    return chunks


async def record(tmp_path: Path, chunks: list[bytes], ticks: set[int], typed: bool) -> str:
    """What a session stores of `chunks` typed (or printed), with a flush tick after each index in `ticks`."""
    session = Recorded(tmp_path)
    for index, chunk in enumerate(chunks):
        session.typed(chunk) if typed else session.printed(chunk)
        if index in ticks:
            await session.tick()
    inputs, output = await session.end()
    return inputs if typed else output


sizes = st.lists(st.integers(1, 9) | st.sampled_from([255, 1024, 4096]), min_size=1, max_size=5)
secret_at_any_offset = (st.sampled_from(SECRETS), st.integers(0, 5000), st.integers(0, 200), sizes)


def session_text(printed: str, before: int, after: int) -> str:
    return (FILLER * 800)[:before] + printed + (FILLER * 40)[:after] + "\r"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*secret_at_any_offset, st.sets(st.integers(0, 600), max_size=8))
def test_typed_input_stores_a_secret_at_any_offset_cut_anywhere_masked(
    tmp_path, secret, before, after, sizes_, ticks
):
    printed, clear = secret
    text = session_text(printed, before, after)
    stored = asyncio.run(record(tmp_path, cut(text.encode(), sizes_), ticks, typed=True))
    assert clear not in stored
    assert stored == MASKING.text.mask(text)  # exactly as one pass over the whole input


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*secret_at_any_offset, st.sets(st.integers(0, 600), max_size=8))
def test_unmasked_output_stores_a_secret_at_any_offset_cut_anywhere_masked(
    tmp_path, secret, before, after, sizes_, ticks
):
    printed, clear = secret
    text = session_text(printed, before, after)
    stored = asyncio.run(record(tmp_path, cut(text.encode(), sizes_), ticks, typed=False))
    assert clear not in stored
    assert stored == MASKING.text.mask(text)


# -- the red team's cases ------------------------------------------------------------------------------------


async def test_a_private_key_pasted_into_exec_is_stored_masked(tmp_path):
    # A terminal sends a paste's newlines as CR; the echo (CR LF) was masked, the input was not.
    session = Recorded(tmp_path, mask_output=False)  # a masked connection: output is stored as relayed
    session.typed(b"cat > /tmp/key.pem\r")
    session.typed(PEM.replace("\n", "\r").encode() + b"\r")
    session.typed(b"\x04")
    inputs, _ = await session.end()
    assert BODY_LINE not in inputs
    assert inputs == f"cat > /tmp/key.pem\r{MARKER}\r\x04"


async def test_a_private_key_typed_line_by_line_is_stored_masked(tmp_path):
    session = Recorded(tmp_path, mask_output=False)
    for line in PEM.split("\n"):
        session.typed(line.encode() + b"\r")
        await session.tick()
    inputs, _ = await session.end()
    assert BODY_LINE not in inputs and inputs == f"{MARKER}\r"


async def test_typed_input_past_1kib_keeps_no_token_across_the_old_cut(tmp_path):
    session = Recorded(tmp_path)
    line = "echo " + "x" * 1015 + " " + GITHUB + "\r"  # the token began 4 bytes before the 1 KiB cut
    for key in line:
        session.typed(key.encode())
    inputs, _ = await session.end()
    assert GITHUB not in inputs and inputs == line.replace(GITHUB, MARKER)


async def test_output_past_4kib_without_a_newline_keeps_no_token_across_frames(tmp_path):
    session = Recorded(tmp_path)  # an exempt caller, or a connection without masking
    session.printed(b"x" * 4090 + b" " + GITHUB[:10].encode())
    session.printed(GITHUB[10:].encode() + b"\r\n")
    _, output = await session.end()
    assert GITHUB not in output and output == "x" * 4090 + f" {MARKER}\r\n"


async def test_output_held_at_a_flush_tick_stays_held_until_the_token_is_whole(tmp_path):
    session = Recorded(tmp_path)
    session.printed(b"$ " + GITHUB[:12].encode())  # printed slowly, or a pause in the output
    await session.tick()
    session.printed(GITHUB[12:].encode() + b"\r\n")
    await session.tick()
    _, output = await session.end()
    assert output == f"$ {MARKER}\r\n"


# -- the end of a session, and the bound ---------------------------------------------------------------------


async def test_a_prompt_is_stored_at_once_and_a_possible_secret_waits(tmp_path):
    session = Recorded(tmp_path)
    session.printed(b"ok\r\n$ ")
    await session.tick()
    assert parse_cast(session.stored()).output() == "ok\r\n$ "  # nothing in it could begin a secret
    session.printed(b"ghp_Zx9")
    await session.tick()
    assert "ghp_" not in session.stored()


async def test_a_secret_still_in_progress_at_the_end_is_hidden_not_stored_in_part(tmp_path):
    # A key pasted but for its last line, then the session ends (Ctrl-C, the connection drops): most of a
    # private key is worth nearly as much as all of it.
    session = Recorded(tmp_path)
    session.typed(b"cat > k\r" + "\r".join(PEM.split("\n")[:-1]).encode() + b"\r")
    session.printed(b"token: " + GITHUB[:20].encode())
    inputs, output = await session.end()
    assert inputs == f"cat > k\r{MARKER}" and BODY_LINE not in inputs
    assert output == f"token: {MARKER}"


async def test_a_match_open_at_the_bound_is_the_marker_never_a_prefix(tmp_path):
    session = Recorded(tmp_path)
    bound = StreamMasker(MASKING.text, MASKING.settings.max_secret_bytes).bound
    session.typed(b"export DB_PASSWORD=")
    for _ in range(bound // 1000 + 2):  # a value longer than the bound, pasted in pieces
        session.typed(b"Q" * 1000)
    session.typed(b" done\r")
    inputs, _ = await session.end()
    assert inputs == f"export DB_PASSWORD={MARKER} done\r"
