"""Where a pattern's match can begin: the literal text every match of it starts with.

Stream masking looks for matches still in progress at the end of the unfinished line (partial matching).
Trying every position of a long line without newlines with every detector's regex cost about 30 ms per
32 KB frame (exec output of a binary or base64 dump went at 1-5 MB/s). Most detectors' matches begin with a
literal (`ghp_`, `AKIA`, `eyJ`, `password`…): a match, complete or in progress, can then only begin where one
of those literals begins, or where the end of the line is the beginning of one. `MatchStarts` finds those
places with one Aho-Corasick pass; the regex is tried there only. A pattern whose start cannot be reduced to literals
(a character class, a repetition first) gets no `MatchStarts` and is tried everywhere, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from re import _constants as sre_constants
from re import _parser as sre_parser
from typing import Any

import ahocorasick

from . import scanner

MAX_PREFIXES = 64  # beyond this many alternatives the literals are cut where they are
MIN_PREFIX = 2  # a one-character literal would make nearly every position a candidate
ZERO_WIDTH = (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT)

_Prefixes = list[tuple[str, bool]]  # (literal so far, whether the literal stopped there)


@dataclass(frozen=True)
class MatchStarts:
    prefixes: tuple[str, ...]  # lower case when `ignore_case`
    ignore_case: bool


class StartIndex:
    """The literals of several patterns in one Aho-Corasick automaton (one for exact ones, one for those
    matched ignoring case): one pass over a line finds where each pattern's matches can begin."""

    def __init__(self, starts: list[MatchStarts | None]):
        self.starts = starts
        by_literal: dict[tuple[bool, str], list[int]] = {}
        for index, found in enumerate(starts):
            if found is None:
                continue
            for literal in found.prefixes:
                by_literal.setdefault((found.ignore_case, literal), []).append(index)
        self.automata: dict[bool, ahocorasick.Automaton] = {}
        for (ignore_case, literal), indexes in by_literal.items():
            automaton = self.automata.setdefault(ignore_case, ahocorasick.Automaton())
            automaton.add_word(literal, (len(literal), tuple(indexes)))
        for automaton in self.automata.values():
            automaton.make_automaton()
        # The same literals as one Hyperscan database, for ASCII lines (a character is a byte there, and
        # ASCII case folding is `str.lower`'s): about 20 µs for a 32 KB frame where the two automata take
        # half a millisecond, which held exec output through masking to about 25 MB/s (issue 15).
        self._literals = [(len(literal), tuple(indexes)) for (_, literal), indexes in by_literal.items()]
        self.database: Any = None
        keys = list(by_literal)
        if scanner.available() and keys and all(literal.isascii() for _, literal in keys):
            self.database = scanner.literal_database(
                [literal.encode() for _, literal in keys], [ignore_case for ignore_case, _ in keys]
            )
        # Every beginning of each pattern's literals shorter than the literal: an end of line that is one
        # may be a match that has only begun.
        self.heads = [
            frozenset(literal[:size] for literal in found.prefixes for size in range(1, len(literal)))
            if found is not None
            else frozenset()
            for found in starts
        ]
        self.longest = [max(map(len, found.prefixes)) if found is not None else 0 for found in starts]

    def candidates(self, line: str) -> list[list[int] | None]:
        """For each pattern, the positions of `line` where a match may begin, in order; None when every
        position must be tried (no literal known, or text that is not ASCII for a pattern that ignores
        case: `str.lower` does not fold the way the regex does, e.g. the long s matches `s`)."""
        found: list[set[int] | None] = [set() if s is not None else None for s in self.starts]
        ascii = line.isascii()
        searched = ascii and self.database is not None
        lowered = line.lower() if ascii and not searched else None
        if searched:
            literals = self._literals

            def on_match(literal: int, _start: int, end: int, _flags: int, _context: Any) -> None:
                size, indexes = literals[literal]
                for index in indexes:
                    places = found[index]
                    if places is not None:
                        places.add(end - size)

            self.database.scan(line.encode("ascii"), match_event_handler=on_match)
        for ignore_case, automaton in self.automata.items() if not searched else ():
            if ignore_case and not ascii:
                for index, s in enumerate(self.starts):
                    if s is not None and s.ignore_case:
                        found[index] = None
                continue
            for end, (size, indexes) in automaton.iter(lowered if ignore_case else line):
                for index in indexes:
                    places = found[index]
                    if places is not None:
                        places.add(end - size + 1)
        length = len(line)
        for index, places in enumerate(found):
            if places is None:
                continue
            heads = self.heads[index]
            first = max(0, length - self.longest[index] + 1)
            # the line's last characters (lower case for a pattern that ignores it: the line is ASCII then)
            tail = line[first:].lower() if self.starts[index].ignore_case else line[first:]  # type: ignore[union-attr]
            for offset in range(len(tail)):
                if tail[offset:] in heads:
                    places.add(first + offset)
        return [sorted(places) if places is not None else None for places in found]


def match_starts(pattern: re.Pattern[str]) -> MatchStarts | None:
    """The literals every match of `pattern` begins with, or None when that cannot be said."""
    try:
        parsed = sre_parser.parse(pattern.pattern, pattern.flags)
    except Exception:
        return None
    ignore_case = bool(parsed.state.flags & re.IGNORECASE)
    prefixes = _sequence(list(parsed))
    if prefixes is None:
        return None
    literals = {literal.lower() if ignore_case else literal for literal, _ in prefixes}
    if not literals or min(len(literal) for literal in literals) < MIN_PREFIX:
        return None
    return MatchStarts(tuple(sorted(literals)), ignore_case)


def _sequence(items: list[Any]) -> _Prefixes | None:
    out: _Prefixes = [("", False)]
    for item in items:
        if all(stopped for _, stopped in out):
            break
        options = _item(item)
        if options is None:
            return None
        grown: _Prefixes = []
        for literal, stopped in out:
            if stopped:
                grown.append((literal, True))
            else:
                grown += [(literal + more, more_stopped) for more, more_stopped in options]
        if len(grown) > MAX_PREFIXES:
            return [(literal, True) for literal, _ in out]  # cut here: still a true (shorter) start
        out = grown
    return out


def _item(item: tuple[Any, Any]) -> _Prefixes | None:
    """The literals one parsed item begins with (None: it changes flags, which is not followed here)."""
    op, value = item
    if op == sre_constants.LITERAL:
        return [(chr(value), False)]
    if op in ZERO_WIDTH:
        return [("", False)]  # consumes nothing: the literal goes on after it
    if op == sre_constants.SUBPATTERN:
        _group, add_flags, del_flags, items = value
        if add_flags or del_flags:
            return None
        return _sequence(list(items))
    if op == sre_constants.BRANCH:
        out: _Prefixes = []
        for branch in value[1]:
            options = _sequence(list(branch))
            if options is None:
                return None
            out += options
        return out
    if op == sre_constants.IN and all(kind == sre_constants.LITERAL for kind, _ in value) and len(value) <= 4:
        return [(chr(char), False) for _, char in value]
    return [("", True)]  # anything else (a class, a repetition, `.`): the literal ends before it
