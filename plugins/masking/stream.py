"""Masking a byte stream (`pods/log`, `logs -f`, exec/attach stdout/stderr) wherever its chunks are cut.

One `StreamMasker` per stream (per channel for exec/attach). It keeps the bytes it has not sent yet and
sends only what no later byte can turn into part of a secret:

- known values: it holds back the longest tail of the stream that is the beginning of some known value form
  (raw, base64, URL-encoded) — across newlines, so the first lines of a multi-line value (a PEM key) wait
  until the value is complete or has turned into something else;
- patterns (detectors, `KEY=VALUE` assignments, custom regexes) are line-local: it holds back the part of
  the last line where a match may still be in progress (the `regex` package's partial matching tells), from
  where the masked part would begin (an assignment's value, not its key);
- the bound: at most `max(longest known form, max_secret_bytes)` characters are held. A match still open at
  the bound (a 10 MiB token after `password=`) is replaced by the marker there and its continuation is
  swallowed up to the next whitespace or quote, so no prefix of it goes out.

Complete lines that hold nothing in progress go out at once (`logs -f` stays live), and so does the part of
an unfinished line before any match in progress (a keystroke's echo, most of the time).

The emitted text stays in a bounded context (the original bytes, not the masked ones) so that a secret whose
beginning had to go out — the exec/attach timer (`flush`) sends what is held after `exec_hold_ms` — is still
masked from where the stream stands once the rest arrives. A stream that is stored (a session recording)
has no timer and ends with `close`, which hides a secret still in progress instead of sending its beginning.
"""

from __future__ import annotations

import base64
import logging
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import regex

from .forms import HEAD  # a known value form is located by its first HEAD characters, then verified
from .starts import MatchStarts, StartIndex, match_starts
from .text import ASSIGNMENT, TextMasker, masked_group

rules_log = logging.getLogger("kubegate.masking")
# Characters of left context kept after they went out (lookbehinds, an assignment's key before its value).
LEFT_CONTEXT = 1024
# Characters searched before where a match may begin, for the patterns' lookbehinds and `\b`s.
LOOKBEHIND = 64
# More candidate starts than this in the tail (text crafted to repeat the heads): all are held, unverified.
MAX_CANDIDATES = 64
# Where a secret cut at the bound stops being swallowed.
SWALLOW_STOP = re.compile(rb"[ \t\n\r\f\v\"']")
DEFAULT_MAX_SECRET_BYTES = 16 * 1024


@dataclass
class _Rules:
    """What a `TextMasker` needs for streaming, built once per masker (known values change → new masker)."""

    # (line-local regex — None: any line may hold a match —, its masked group, the regex of what precedes
    # that group: None for group 0)
    partial: list[tuple[regex.Pattern[str] | None, int, regex.Pattern[str] | None]] = field(
        default_factory=list
    )
    # Where the matches of each of `partial` can begin (starts.py).
    starts: StartIndex = field(default_factory=lambda: StartIndex([]))


_RULES: weakref.WeakKeyDictionary[TextMasker, _Rules] = weakref.WeakKeyDictionary()


def _rules(masker: TextMasker) -> _Rules:
    rules = _RULES.get(masker)
    if rules is not None:
        return rules
    sources = [pattern for pattern in masker.always] + [pattern for _, pattern in masker.patterns]
    if masker.scanner is not None:
        sources = [
            p.regex for p in masker.scanner.patterns + masker.scanner.leftover if p.regex is not ASSIGNMENT
        ]
    groups = [(p, masked_group(p)) for p in sources] + ([(ASSIGNMENT, 4)] if masker.assignments else [])
    partial = []
    starts: list[MatchStarts | None] = []
    for pattern, group in groups:
        starts.append(match_starts(pattern))
        try:
            compiled = _line_local(pattern.pattern, pattern.flags)
        except regex.error:  # a custom regex `re` takes and `regex` does not: its lines are held whole
            rules_log.warning(
                "masking: %r cannot be matched partially; streams hold its lines", pattern.pattern
            )
            compiled = None
        partial.append((compiled, group, _before_group(pattern, group)))
    rules = _Rules(partial, StartIndex(starts))
    _RULES[masker] = rules
    return rules


def _matches_at(pattern: regex.Pattern[str], line: str, positions: list[int]) -> Iterator[regex.Match[str]]:
    """What `pattern.finditer(line, partial=True, overlapped=True)` finds, tried only at `positions` (the
    only places its matches can begin; lookbehinds still see what precedes them). Empty matches are left
    out: `_hold` does nothing with one (it would only end the search, at the end of the line)."""
    for position in positions:
        match = pattern.match(line, position, partial=True)
        if match is not None and match.end() > match.start():
            yield match


def _line_local(source: str, flags: int) -> regex.Pattern[str]:
    return regex.compile(source, flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE))


def _before_group(pattern: re.Pattern[str], group: int) -> regex.Pattern[str] | None:
    """The part of `pattern` before its `group`-th capturing group opens, as a regex (None for group 0, or
    when that part is not a regex by itself — a group nested in another: the whole match is held then).
    A partial match does not say where an open group began; this does: the secret part of `password: hu`
    begins after `password: `, so the key may go out while the value is held."""
    if not group:
        return None
    source, index, seen, in_class = pattern.pattern, 0, 0, False
    while index < len(source):
        char = source[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if source[index + 1 : index + 2] == "]" or source[index + 1 : index + 3] == "^]":
                index += 2 if source[index + 1] == "]" else 3
                continue
        elif char == "(" and source[index + 1 : index + 2] != "?":
            seen += 1
            if seen == group:
                try:
                    return _line_local(source[:index], pattern.flags)
                except regex.error:
                    return None
        index += 1
    return None


def secret_spans(masker: TextMasker, text: str) -> list[tuple[int, int]]:
    """Where `masker` would put a marker in `text`: known values, detector matches, assignment values (the
    masked group of each match), as (start, end) character offsets, unsorted, possibly overlapping."""
    spans: list[tuple[int, int]] = []
    if masker.known is not None:
        spans += masker.known.spans(text)
    if spans:
        # Patterns look at the text with the known values gone, as `TextMasker.mask` does (their place
        # blanked with newlines, so offsets stay and no pattern runs through it): a URL around a known
        # password is not a second match to check.
        text = _blanked(text, spans)
    if masker.scanner is not None:
        data = text.encode("utf-8", "surrogateescape")
        found = masker.scanner.spans(data)
        if found and len(data) != len(text):  # not ASCII: byte offsets → character offsets
            found = [(_chars(data, start), _chars(data, end)) for start, end in found]
        spans += found
        regexes = [leftover.regex for leftover in masker.scanner.leftover]
    else:
        hints = {hint for _, hint in masker.hint_automaton.iter(text.lower())}
        regexes = [*masker.always, *(p for h, p in masker.patterns if any(x in hints for x in h))]
        if masker.assignments and hints & masker.keywords:
            spans += masker.assignment_spans(text)
    for pattern in regexes:
        group = masked_group(pattern)
        for match in pattern.finditer(text):
            span = match.span(group) if group and match.group(group) else match.span()
            if span[1] > span[0]:
                spans.append(span)
    return spans


def _blanked(text: str, spans: list[tuple[int, int]]) -> str:
    parts: list[str] = []
    position = 0
    for start, end in spans:  # in order, not overlapping (leftmost-longest)
        parts += (text[position:start], "\n" * (end - start))
        position = end
    parts.append(text[position:])
    return "".join(parts)


def _chars(data: bytes, offset: int) -> int:
    return len(data[:offset].decode("utf-8", "surrogateescape"))


def _incomplete_utf8(text: str) -> int:
    """How many characters at the end of `text` are the escaped bytes of a UTF-8 sequence not yet complete
    (held so that a character cut by a chunk boundary is matched whole once its bytes are all here)."""
    for count in (1, 2, 3):
        if len(text) < count:
            return 0
        char = ord(text[-count])
        if not 0xDC80 <= char <= 0xDCFF:
            return 0
        byte = char - 0xDC00
        if byte >= 0xC2:  # a lead byte: complete once 2 (C2-DF), 3 (E0-EF) or 4 (F0-F4) bytes are here
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return count if count < needed and byte <= 0xF4 else 0
        if byte >= 0xC0 or byte < 0x80:
            return 0
    return 0


class StreamMasker:
    """Masks one text stream fed in chunks of any size; see the module docstring for what is held.

    `min_hold` is the shortest in-progress match that is held at all: 1 (everything, exact: the output is
    the same however the stream is cut) for logs; more for interactive output, where holding the echo of
    every keystroke that could begin something would delay typing (what goes out is at most
    `min_hold - 1` characters of a detector's format prefix or of a known value, whose rest is masked).
    """

    def __init__(self, masker: TextMasker, max_secret_bytes: int = DEFAULT_MAX_SECRET_BYTES,
                 min_hold: int = 1):  # fmt: skip
        self.masker = masker
        self.max_secret_bytes = max_secret_bytes
        self.min_hold = max(1, min_hold)
        self.context = ""  # emitted text (original characters), kept for matches that continue
        self.pending = b""  # received, not emitted
        self.swallowing = False
        # Where in context + pending a pattern match may be in progress: none starts before this one (each
        # match open at the end of a feed was found then), so a feed searches only what is new.
        self.open_from = 0

    @property
    def holding(self) -> bool:
        return bool(self.pending)

    @property
    def bound(self) -> int:
        return max(self.masker.longest, self.max_secret_bytes)

    def use(self, masker: TextMasker) -> None:
        """Mask with a newer masker (the known values changed); what is held stays held."""
        self.masker = masker

    def feed(self, data: bytes) -> bytes:
        """The part of the stream so far that can go out now, masked."""
        if self.swallowing:
            stop = SWALLOW_STOP.search(data)
            if stop is None:
                return b""
            self.swallowing, data = False, data[stop.start() :]
        if not data:
            return b""
        return self._emit(self.pending + data, final=False)

    def flush(self) -> bytes:
        """Everything held, masked as it stands (the exec/attach timer): a secret still in progress goes
        out as far as it came; the context keeps it, so its continuation is masked when it arrives."""
        if not self.pending:
            return b""
        return self._emit(self.pending, final=True)

    def end(self) -> bytes:
        """The end of the stream: everything held, masked."""
        out = self.flush()
        self.context, self.swallowing, self.open_from = "", False, 0
        return out

    def close(self) -> bytes:
        """The end of a stream that is stored (a session recording): everything held, masked, and what was
        held as the possible beginning of a secret — a known value's first lines, a match still open — is
        replaced by the marker, never kept as a prefix (`end` sends it as far as it came)."""
        out = ""
        if self.pending:
            text, spans = self._scan(self.pending)
            emitted_upto = len(self.context)
            cut, _, marker_from = self._hold(text, spans, emitted_upto)
            if cut < len(text):
                out = self._masked(text, spans, emitted_upto, marker_from) + self.masker.marker
            else:
                out = self._masked(text, spans, emitted_upto, len(text))
        self.pending, self.context, self.swallowing, self.open_from = b"", "", False, 0
        return out.encode("utf-8", "surrogateescape")

    def _scan(self, pending: bytes) -> tuple[str, list[tuple[int, int]]]:
        """What went out (the context) and `pending` as one text, and the secrets' spans in it."""
        text = self.context + pending.decode("utf-8", "surrogateescape")
        # What went out is searched again only from where a match may still be open (plus a lookbehind's
        # worth): a match cannot cross into the new text from further back.
        scan_from = max(0, min(self.open_from, len(self.context)) - LOOKBEHIND)
        spans = secret_spans(self.masker, text[scan_from:])
        if scan_from:
            spans = [(start + scan_from, end + scan_from) for start, end in spans]
        return text, spans

    def _emit(self, pending: bytes, final: bool) -> bytes:
        text, spans = self._scan(pending)
        emitted_upto = len(self.context)  # text[:emitted_upto] went out already
        length = len(text)
        cut, keep_from, marker_from = self._hold(text, spans, emitted_upto)
        if final:
            cut = length
        elif cut == length:
            cut -= _incomplete_utf8(text)
        if not final and length - cut > self.bound:
            # A match open for longer than the bound: what precedes its secret part goes out, then the
            # marker; the rest of it is swallowed up to the next whitespace or quote, never sent.
            out = self._masked(text, spans, emitted_upto, marker_from) + self.masker.marker
            self.pending, self.swallowing = b"", True
            self._keep(text, length, length)
            return out.encode("utf-8", "surrogateescape")
        out = self._masked(text, spans, emitted_upto, cut)
        self.pending = text[cut:].encode("utf-8", "surrogateescape")
        self._keep(text[:cut], keep_from, keep_from)
        return out.encode("utf-8", "surrogateescape")

    def _keep(self, emitted: str, keep_from: int, open_from: int) -> None:
        """Keep the end of what went out as context: enough for lookbehinds and known values, and all of a
        match still in progress (up to the bound)."""
        keep = max(LEFT_CONTEXT, self.masker.longest, len(emitted) - min(keep_from, len(emitted)))
        self.context = emitted[-min(keep, self.bound + LEFT_CONTEXT) :]
        self.open_from = max(0, open_from - (len(emitted) - len(self.context)))

    def _masked(self, text: str, spans: list[tuple[int, int]], start: int, stop: int) -> str:
        """text[start:stop] with each span in it (clipped to it) replaced by the marker; overlapping spans
        get one marker (adjoining ones one each, as `TextMasker.mask` does)."""
        marker = self.masker.marker
        parts: list[str] = []
        position, after_marker = start, False
        for span_start, span_end in sorted(spans):
            if span_end <= position:
                continue
            if span_start >= stop or position >= stop:
                break
            if span_start >= position:
                parts += (text[position:span_start], marker)
            elif not after_marker:  # a span that began before `start` (its beginning went out already)
                parts.append(marker)
            after_marker, position = True, min(span_end, stop)
        parts.append(text[position:stop])
        return "".join(parts)

    def _hold(self, text: str, spans: list[tuple[int, int]], emitted_upto: int) -> tuple[int, int, int]:
        """(where to cut: what follows is held; the earliest start of a match in progress, whose context is
        kept; where the secret part of the match that set the cut begins)."""
        length = len(text)
        cut = marker_from = length
        keep_from = self._known_prefix(text)
        if length - keep_from >= self.min_hold:
            cut = marker_from = keep_from
        # Patterns are line-local: only the last line can hold a match still in progress (searched as its
        # own string: the regex package would otherwise copy all of `text` for each pattern).
        line_start = max(text.rfind("\n") + 1, min(self.open_from, length) - LOOKBEHIND)
        line = text[line_start:]
        rules = _rules(self.masker)
        where = rules.starts.candidates(line) if line else []
        for (pattern, group, before_group), positions in (
            zip(rules.partial, where, strict=True) if line else ()
        ):
            if pattern is None:  # no partial matching for it: the whole unfinished line may be a match
                keep_from = min(keep_from, line_start)
                if len(line) >= self.min_hold and line_start < cut:
                    cut = marker_from = line_start
                continue
            # Overlapped: a match may begin inside an earlier one (`password=x;password: ...` as one value).
            matches = (
                pattern.finditer(line, partial=True, overlapped=True)
                if positions is None
                else _matches_at(pattern, line, positions)
            )
            for match in matches:
                if not match.partial and match.end() < len(line):
                    continue  # complete, and nothing after it can change it: masked by its span
                keep_from = min(keep_from, line_start + match.start())
                if match.end() - match.start() < self.min_hold:
                    break
                secret_start = _secret_start(match, group, before_group)
                if secret_start < 0:  # the masked group has not begun: only the context is kept
                    break
                if line_start + secret_start < cut:
                    cut = marker_from = line_start + secret_start
                break
        # A complete match is never cut in two: a cut inside one moves back to its start.
        crossing = [span for span in spans if span[1] > cut] if cut < length else []
        moved = bool(crossing)
        while moved:
            moved = False
            for start, end in crossing:
                if emitted_upto <= start < cut < end:
                    cut, moved = start, True
        if cut < length:
            # What is held may be the masked part of a match that began further back on its line (a long
            # key before `: value`): the next feed searches again from that line's start.
            keep_from = min(keep_from, text.rfind("\n", 0, cut) + 1)
        return max(cut, emitted_upto), keep_from, max(marker_from, emitted_upto)

    def _known_prefix(self, text: str) -> int:
        """Where the longest tail of `text` that begins some known form starts (len(text) if none)."""
        masker = self.masker
        if masker.known is None:
            return len(text)
        length = len(text)
        window = max(0, length - masker.longest + 1)
        candidates = set(masker.known.head_starts(text, window))
        candidates.update(range(max(window, length - HEAD + 1), length))  # tails shorter than a head
        if len(candidates) > MAX_CANDIDATES:
            return min(candidates)  # a text built to make this slow: hold from the first candidate
        for start in sorted(candidates):
            if masker.known.is_prefix(text[start:]):
                return start
        return length


def _secret_start(match: regex.Match[str], group: int, before_group: regex.Pattern[str] | None) -> int:
    """Where the masked part of an open match begins (-1: not yet)."""
    # `regex` has no type annotations: the positions are named as ints here.
    start: int = match.start()
    if not group:
        return start
    group_start: int = match.start(group)
    if group_start >= 0:
        return group_start
    if before_group is None:
        return start  # unknown: all of it is held
    before = before_group.match(match.string, start, match.end())
    return -1 if before is None else before.end()


class ChannelMaskers:
    """exec/attach output: a `StreamMasker` per channel (stdout, stderr), frames in and out.

    Binary protocols (`v4/v5.channel.k8s.io`): a frame is the channel byte, then data. Base64 protocols
    (`base64.channel.k8s.io`, `v4.base64.channel.k8s.io`, text frames): the channel as a digit, then the data
    in base64 — decoded, masked with the same carry, re-encoded, so every frame sent is valid base64.
    """

    def __init__(self, masker: TextMasker, max_secret_bytes: int, min_hold: int, base64_frames: bool):
        self.masker, self.max_secret_bytes, self.min_hold = masker, max_secret_bytes, min_hold
        self.base64_frames = base64_frames
        self.channels: dict[int, StreamMasker] = {}

    @property
    def holding(self) -> bool:
        return any(stream.holding for stream in self.channels.values())

    def use(self, masker: TextMasker) -> None:
        self.masker = masker
        for stream in self.channels.values():
            stream.use(masker)

    def output(self, channel: int, data: bytes) -> bytes | None:
        """One stdout/stderr frame's data → the frame to send (None: nothing goes out now)."""
        stream = self.channels.get(channel)
        if stream is None:
            stream = self.channels[channel] = StreamMasker(self.masker, self.max_secret_bytes, self.min_hold)
        out = stream.feed(data)
        return self.frame(channel, out) if out else None

    def flush(self) -> list[bytes]:
        """Frames carrying what every channel holds (the timer, or before another channel's frame)."""
        frames = []
        for channel, stream in sorted(self.channels.items()):
            out = stream.flush()
            if out:
                frames.append(self.frame(channel, out))
        return frames

    def frame(self, channel: int, data: bytes) -> bytes:
        if self.base64_frames:
            return str(channel).encode() + base64.b64encode(data)
        return bytes([channel]) + data
