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
from dataclasses import dataclass

import ahocorasick

HEAD = 6  # how many first characters of each form stream masking indexes (see stream.py `_known_prefix`)


@dataclass(frozen=True)
class FormSet:
    """One automaton over a set of forms (each word's value is its length), and one over their heads."""

    automaton: ahocorasick.Automaton
    heads: ahocorasick.Automaton
    longest: int
    size: int

    @classmethod
    def build(cls, forms: Iterable[str]) -> FormSet:
        automaton, heads, longest, size = ahocorasick.Automaton(), ahocorasick.Automaton(), 0, 0
        for form in forms:
            if not form:
                continue
            automaton.add_word(form, len(form))
            head = form[:HEAD]
            heads.add_word(head, len(head))
            longest, size = max(longest, len(form)), size + 1
        if size:
            automaton.make_automaton()
            heads.make_automaton()
        return cls(automaton, heads, longest, size)


class KnownForms:
    """The parts a text masker searches; immutable (a change makes a new one that shares unchanged parts)."""

    def __init__(self, parts: Iterable[FormSet]):
        self.parts = tuple(part for part in parts if part.size)
        self.longest = max((part.longest for part in self.parts), default=0)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of the known forms in `text`, sorted, disjoint: every occurrence of every form, and
        where occurrences overlap (two values run into each other, or one part's value into another's), one
        span over both.

        Leftmost-longest matching (the fast scan) skips an occurrence that begins inside the one before it;
        its tail would go out. So around each match — matches are rare — every occurrence that begins inside
        it is looked for too, and the span grows to cover it."""
        found = sorted(
            (end - length + 1, end + 1)
            for part in self.parts
            for end, length in part.automaton.iter_long(text)
        )
        spans: list[tuple[int, int]] = []
        for start, stop in found:
            if spans and start < spans[-1][1]:  # overlaps the span before (another part's match): one span
                previous_start, previous_stop = spans.pop()
                start, stop = previous_start, max(previous_stop, stop)
            spans.append((start, self._run_on(text, start, stop)))
        return spans

    def _run_on(self, text: str, start: int, stop: int) -> int:
        """Where the occurrences that begin in text[start:stop] end (and those that begin in them, ...)."""
        while True:
            furthest = stop
            for part in self.parts:
                # a slice: the automaton copies the whole string it is given, whatever the bounds
                window = text[start : stop + part.longest - 1]
                for end, length in part.automaton.iter(window):
                    if start + end - length + 1 < stop:
                        furthest = max(furthest, start + end + 1)
            if furthest == stop:
                return stop
            start, stop = stop, furthest

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
