"""The known values' forms as Aho-Corasick automata, in parts that can be replaced one at a time.

Why parts: building one automaton over every form of thousands of Secret values takes a noticeable fraction
of a second of CPU under the interpreter lock (pyahocorasick's `make_automaton` does not release it). Doing
that on the event loop for every Secret event froze every request of the gateway for that long, and a burst of
events (a namespace deleted, a chart installed) for that long times the burst. So a `KnownForms` is a large
*base* part, rebuilt in a worker thread and only when needed, and a small *delta* part with the values added
since, built at once: a new value is masked as soon as its event is read, and nothing waits for the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import ahocorasick

from . import scanner

HEAD = 6  # how many first characters of each form stream masking indexes (see stream.py `_known_prefix`)


class LiteralScan:
    """A set of forms as one Hyperscan literal database: every occurrence of every form in one pass over
    ASCII text, about 0.6 ms for a 1.2 MB list where the automaton takes 9-50 ms (issue 15).

    Only for text that is all ASCII, where a character is a byte: then the forms that are not ASCII cannot
    occur and are left out. Hyperscan's literal compiler ends a form at a NUL byte, so a set with a form
    holding one gets no database (`build` returns None) and its automaton serves. Compiling takes about a
    second for 25,000 forms and releases the interpreter lock: it is done in a worker thread (known.py)."""

    def __init__(self, database: Any, lengths: list[int]):
        self.database, self.lengths = database, lengths

    @classmethod
    def build(cls, forms: Iterable[str]) -> LiteralScan | None:
        if not scanner.available():
            return None
        literals = [form.encode() for form in forms if form and form.isascii()]
        if not literals:
            return cls(None, [])
        database = scanner.literal_database(literals)
        return None if database is None else cls(database, [len(literal) for literal in literals])

    def occurrences(self, data: bytes, found: list[tuple[int, int]]) -> None:
        """Append (start, end) of every occurrence of every form in `data` (ASCII) to `found`."""
        if self.database is None:
            return
        lengths = self.lengths

        def on_match(form: int, _start: int, end: int, _flags: int, _context: Any) -> None:
            found.append((end - lengths[form], end))

        self.database.scan(data, match_event_handler=on_match)


@dataclass(frozen=True)
class FormSet:
    """One automaton over a set of forms (each word's value is its length), and one over their heads; and,
    once compiled (`with_literals`), the same forms as a Hyperscan literal database."""

    automaton: ahocorasick.Automaton
    heads: ahocorasick.Automaton
    longest: int
    size: int
    forms: tuple[str, ...] = ()
    literals: LiteralScan | None = None

    @classmethod
    def build(cls, forms: Iterable[str], *, literals: bool = False) -> FormSet:
        """The automata of `forms` (fast to build); with `literals`, the literal database too (slow to
        compile: off the event loop)."""
        automaton, heads, longest, size = ahocorasick.Automaton(), ahocorasick.Automaton(), 0, 0
        kept = tuple(form for form in forms if form)
        for form in kept:
            automaton.add_word(form, len(form))
            head = form[:HEAD]
            heads.add_word(head, len(head))
            longest, size = max(longest, len(form)), size + 1
        if size:
            automaton.make_automaton()
            heads.make_automaton()
        built = cls(automaton, heads, longest, size, kept)
        return built.with_literals() if literals else built

    def with_literals(self) -> FormSet:
        """This set with its literal database (itself when it has one, or none can be built)."""
        if self.literals is not None or not self.size:
            return self
        database = LiteralScan.build(self.forms)
        return self if database is None else replace(self, literals=database)


class KnownForms:
    """The parts a text masker searches; immutable (a change makes a new one that shares unchanged parts)."""

    def __init__(self, parts: Iterable[FormSet]):
        self.parts = tuple(part for part in parts if part.size)
        self.longest = max((part.longest for part in self.parts), default=0)
        # Every part has its literal database: ASCII text is searched by Hyperscan (see `LiteralScan`).
        self.literal = bool(self.parts) and all(part.literals is not None for part in self.parts)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of the known forms in `text`, sorted, disjoint: every occurrence of every form, and
        where occurrences overlap (two values run into each other, or one part's value into another's), one
        span over both.

        With literal databases and ASCII text, Hyperscan reports every occurrence; otherwise the automata's
        `iter` does (every word ending at every position). Not the leftmost-longest `iter_long`, used here
        before: it drops matches reached through more than one failure link — with "b", "ab1" and "1ab1"
        known it found nothing in "1ab", and with "db-password-1" and "mydb-password-12" known it let
        "mydb-password-1" at the end of a text go out in clear."""
        if self.literal and text.isascii():
            found: list[tuple[int, int]] = []
            data = text.encode("ascii")
            for part in self.parts:
                assert part.literals is not None
                part.literals.occurrences(data, found)
        else:
            found = [
                (end - length + 1, end + 1)
                for part in self.parts
                for end, length in part.automaton.iter(text)
            ]
        return merged(found)

    def is_prefix(self, text: str) -> bool:
        """Whether `text` is the beginning of some form (or a whole form)."""
        return any(part.automaton.match(text) for part in self.parts)

    def head_starts(self, text: str, window: int) -> Iterator[int]:
        """Where a form's head (its first `HEAD` characters, or all of a shorter form) occurs in
        `text[window:]`."""
        tail = text[window:]  # a slice: the automaton copies the whole string it is given
        for part in self.parts:
            for end, size in part.heads.iter(tail):
                yield window + end - size + 1


def merged(found: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Occurrences as sorted, disjoint spans: overlapping ones (one value running into another) merged."""
    found.sort()
    spans: list[tuple[int, int]] = []
    for start, stop in found:
        if spans and start < spans[-1][1]:
            if stop > spans[-1][1]:
                spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return spans
