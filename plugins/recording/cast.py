"""asciicast v2: the writer the recorder feeds, the reader, and the player behind `kubegate replay`.

The format (https://docs.asciinema.org/manual/asciicast/v2/) is one JSON header line, then one JSON array
per event: ``[seconds_since_start, code, data]`` with ``o`` (output), ``i`` (input) and ``r`` (resize,
``"WxH"``). Standard players (asciinema, asciinema-player) read it, which is why the exit status, the pod and
the caller live in the sessions table instead of in the file.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

DEFAULT_SIZE = (80, 24)


class CastError(ValueError):
    """Text that is not an asciicast v2 recording; the message says where."""


class CastWriter:
    """Turns a session's bytes into asciicast lines, kept in memory until :meth:`take` hands them over.

    Bytes are decoded per stream with an incremental UTF-8 decoder, so a character split across two frames
    comes out whole; what is not UTF-8 becomes U+FFFD. The header is written with the first event, so a
    resize that comes before any output (kubectl sends the terminal size first) sizes the header instead of
    becoming an ``r`` event.
    """

    def __init__(self, started: float, *, title: str = "", term: str = "xterm-256color") -> None:
        self.started = started  # wall-clock time of the session start (the header's `timestamp`)
        self.title, self.term = title, term
        self.width: int | None = None
        self.height: int | None = None
        self.header_written = False
        self.events = 0
        self.pending_bytes = 0
        self._pending: list[str] = []
        self._last = 0.0
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}

    # -- events ------------------------------------------------------------------------------------------

    def output(self, t: float, data: bytes, stream: str = "stdout") -> None:
        self._text(t, "o", stream, data)

    def input(self, t: float, data: bytes) -> None:
        self._text(t, "i", "stdin", data)

    def resize(self, t: float, width: int, height: int) -> None:
        if not self.header_written:
            self.width, self.height = width, height
            return
        if (width, height) != (self.width, self.height):
            self.width, self.height = width, height
            self._event(t, "r", f"{width}x{height}")

    def finish(self, t: float) -> None:
        """End of the session: what the decoders still hold goes out, and the header exists even when the
        session printed nothing."""
        for stream, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                self._event(t, "i" if stream == "stdin" else "o", tail)
        self._ensure_header()

    def take(self) -> str:
        """The lines written since the last call (the header first), emptying the buffer."""
        text = "".join(self._pending)
        self._pending.clear()
        self.pending_bytes = 0
        return text

    def drop_pending(self) -> int:
        """Forget buffered events (storage is failing and memory must stay bounded); returns the bytes lost."""
        lost = self.pending_bytes
        keep = [self._pending[0]] if self._pending and self._pending[0].startswith("{") else []
        self._pending[:] = keep
        self.pending_bytes = sum(len(line) for line in keep)
        return lost - self.pending_bytes

    # -- internals ---------------------------------------------------------------------------------------

    def _text(self, t: float, code: str, stream: str, data: bytes) -> None:
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(data)
        if text:
            self._event(t, code, text)

    def _ensure_header(self) -> None:
        if self.header_written:
            return
        self.header_written = True
        self.width = self.width or DEFAULT_SIZE[0]
        self.height = self.height or DEFAULT_SIZE[1]
        header: dict[str, Any] = {
            "version": 2,
            "width": self.width,
            "height": self.height,
            "timestamp": int(self.started),
            "env": {"TERM": self.term},
        }
        if self.title:
            header["title"] = self.title
        line = json.dumps(header, ensure_ascii=False) + "\n"
        self._pending.insert(0, line)
        self.pending_bytes += len(line)

    def _event(self, t: float, code: str, data: str) -> None:
        self._ensure_header()
        t = max(t, self._last)  # players expect times that never go back
        self._last = t
        line = json.dumps([round(t, 6), code, data], ensure_ascii=False) + "\n"
        self._pending.append(line)
        self.pending_bytes += len(line)
        self.events += 1


@dataclass
class Cast:
    header: dict[str, Any]
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def output(self) -> str:
        """Everything the terminal showed, without the timing."""
        return "".join(data for _, code, data in self.events if code == "o")


def parse_cast(text: str) -> Cast:
    """Read an asciicast v2 recording. A last line cut short by a crash is ignored; anything else that is
    not an event is an error."""
    lines = text.splitlines()
    if not lines:
        raise CastError("empty recording")
    try:
        header = json.loads(lines[0])
    except ValueError:
        raise CastError("line 1: the header is not JSON") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CastError("line 1: not an asciicast v2 header")
    cast = Cast(header)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # written half when the gateway died
            raise CastError(f"line {number}: not JSON") from None
        if not (isinstance(event, list) and len(event) == 3 and isinstance(event[0], int | float)):
            raise CastError(f"line {number}: not an event [time, code, data]")
        cast.events.append((float(event[0]), str(event[1]), str(event[2])))
    return cast


def play(
    cast_text: str,
    out: TextIO,
    speed: float = 1.0,
    max_wait: float | None = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Write the output events of a recording to `out` with their timing; returns how many were written.

    Gaps between events are first capped at `max_wait` seconds (None or 0: no cap, so a session left idle
    for an hour does not replay an hour of nothing), then divided by `speed`. Input (``i``) events are not
    written: the terminal echoed what was typed, so it is in the output already (and a password typed at a
    prompt that does not echo stays unseen). Resizes cannot be applied to the viewer's terminal and are
    skipped. `sleep` is injectable so that tests never wait.
    """
    if not speed > 0:
        raise ValueError("speed must be greater than 0")
    cast = parse_cast(cast_text)
    previous = 0.0
    written = 0
    for t, code, data in cast.events:
        if code != "o":
            continue
        gap = max(0.0, t - previous)
        previous = t
        if max_wait:
            gap = min(gap, max_wait)
        if gap > 0:
            sleep(gap / speed)
        out.write(data)
        out.flush()
        written += 1
    return written
