"""Secret-shaped patterns found in one pass of a compiled scanner (Hyperscan), then confirmed by Python's `re`.

Why: running a dozen regexes over every byte (or first locating hint words with an automaton, then running
them around each hint) costs tens of milliseconds per megabyte in Python; Hyperscan matches all patterns
at once at memory speed and calls back only where a pattern may start. Each report is then checked with
the pattern's own Python regex at that start, which also gives the exact span (Hyperscan knows no groups
and no lookarounds: those are dropped for the scan and kept for the check, so the scan is a superset).

Patterns Hyperscan cannot compile even so (some custom regexes) are run by `re` over the whole text, as
is everything where the `hyperscan` package is not installed (it has no wheel for Linux on ARM): see
`TextMasker`, which keeps the slower hint-gated path for that case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

try:
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None  # type: ignore[assignment]

# Lookarounds and \b-free tails that Hyperscan refuses; removing one only widens what the scan reports.
LOOKAROUND = re.compile(r"\(\?<?[=!](?:[^()\\]|\\.)*\)")


def available() -> bool:
    return hyperscan is not None


def literal_database(literals: Sequence[bytes], caseless: Sequence[bool] = ()) -> Any | None:
    """A block-mode database of `literals` (each one's id: its position), by Hyperscan's literal compiler,
    which reports every occurrence of every literal; `caseless[i]`: literal i ignoring ASCII case. None when
    a literal holds a NUL byte: the compiler would end it there (and find its beginning everywhere), so the
    caller searches another way."""
    assert hyperscan is not None
    if any(b"\0" in literal for literal in literals):
        return None
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = [hyperscan.HS_FLAG_CASELESS if ignore else 0 for ignore in caseless] if caseless else 0
    database.compile(
        expressions=list(literals),
        ids=list(range(len(literals))),
        elements=len(literals),
        flags=flags,
        literal=True,
    )
    return database


class Pattern:
    """One pattern: the regex that decides, which group is masked (0: the whole match), and `skip`: a match
    it says yes to is not masked (the assignment rule's non-secret names, see text.py)."""

    def __init__(
        self,
        regex: re.Pattern[str],
        group: int = 0,
        skip: Callable[[bytes, re.Match[bytes]], bool] | None = None,
    ):
        self.regex = regex
        self.check = re.compile(regex.pattern.encode(), regex.flags & ~re.UNICODE)
        self.group = group
        self.skip = skip


class PatternScanner:
    """Masks matches of many patterns in one Hyperscan pass. `leftover` are those it could not compile."""

    def __init__(self, patterns: Sequence[Pattern], marker: str, scan_forms: dict[int, str] | None = None):
        assert hyperscan is not None
        self.marker = marker.encode()
        self.patterns: list[Pattern] = []
        self.leftover: list[Pattern] = []
        expressions, flags = [], []
        for index, pattern in enumerate(patterns):
            source = (scan_forms or {}).get(index, pattern.regex.pattern)
            compiled = _compile_one(LOOKAROUND.sub("", source), pattern.regex.flags)
            if compiled is None:
                self.leftover.append(pattern)
                continue
            self.patterns.append(pattern)
            expressions.append(compiled[0])
            flags.append(compiled[1])
        self.db: Any = None
        if expressions:
            self.db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            self.db.compile(expressions=expressions, ids=list(range(len(expressions))),
                            elements=len(expressions), flags=flags)  # fmt: skip

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        if self.db is None:
            return []
        starts: set[tuple[int, int]] = set()

        def on_match(pattern_id: int, start: int, _end: int, _flags: int, _context: Any) -> None:
            starts.add((start, pattern_id))

        self.db.scan(data, match_event_handler=on_match)
        spans = []
        for start, pattern_id in starts:
            pattern = self.patterns[pattern_id]
            match = pattern.check.match(data, start)
            if match is None or match.group(pattern.group) is None:
                continue
            if pattern.skip is not None and pattern.skip(data, match):
                continue
            span = match.span(pattern.group)
            if span[1] > span[0] and not data.startswith(self.marker, span[0]):
                spans.append(span)
        return spans


def _compile_one(source: str, re_flags: int) -> tuple[bytes, int] | None:
    assert hyperscan is not None
    flags = hyperscan.HS_FLAG_SOM_LEFTMOST  # a pattern matching the empty string is left to `re`
    if re_flags & re.IGNORECASE:
        flags |= hyperscan.HS_FLAG_CASELESS
    if re_flags & re.DOTALL:
        flags |= hyperscan.HS_FLAG_DOTALL
    if re_flags & re.MULTILINE:
        flags |= hyperscan.HS_FLAG_MULTILINE
    expression = source.encode()
    try:
        probe = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        probe.compile(expressions=[expression], ids=[0], elements=1, flags=[flags])
    except hyperscan.error:
        return None
    return expression, flags


def replace_spans(data: bytes, spans: list[tuple[int, int]], marker: bytes) -> bytes:
    """`data` with each span (overlapping ones merged) replaced by the marker."""
    if not spans:
        return data
    merged: list[list[int]] = []
    for start, stop in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    parts, position = [], 0
    for start, stop in merged:
        parts += [data[position:start], marker]
        position = stop
    parts.append(data[position:])
    return b"".join(parts)
