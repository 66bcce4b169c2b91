"""Stream masking tries a pattern only where its matches can begin (plugins/masking/starts.py).

The promise: the shortcut finds the same match in progress at the end of the line as trying every position —
for every detector, the assignment rule and custom patterns; and where it cannot be sure (no literal start, text whose case folding differs), it tries every
position. A stream fed in pieces still masks what the whole text masks.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.plugins.masking import Masking, MaskingSettings
from kubegate.plugins.masking.starts import StartIndex, match_starts
from kubegate.plugins.masking.stream import StreamMasker, _matches_at, _rules

MASKING = Masking(MaskingSettings(patterns=[r"tok_[a-z]{8}", r"[0-9]{3}-SECRET"]))
RULES = _rules(MASKING.text)
# Pieces that begin (or nearly begin) the detectors' matches, mixed with filler: the hard cases are the
# literals cut at the end of the line and matches that begin inside others.
PIECES = ["ghp_", "gho_", "AKIA", "ASIA", "A3TX", "eyJ", "eyJhbGciOi.", "xoxb-", "123-", "://", "u:p@",
          "password", "PASSWORD", "Passwd", "token", "api_key", "secret", "=", ": ", "'", '"', "sk-", "glpat-",
          "tok_", "SECRET", "-----BEGIN RSA PRIVATE KEY", "aws", "_key", "abcdefgh", "ABCDEFGHIJKLMNOP",
          "0123456789", "q", "Z", " ", "\t", ".", "/", "-"]  # fmt: skip


def every_position(pattern, line):
    return list(pattern.finditer(line, partial=True, overlapped=True))


def first_open(matches, line):
    """What `_hold` acts on: the first non-empty match still in progress or reaching the end of the line (the
    matches before it are complete and masked by their spans; it stops at this one)."""
    for m in matches:
        if m.end() > m.start() and (m.partial or m.end() == len(line)):
            return (m.start(), m.end(), m.partial)
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30))
def test_the_shortcut_finds_what_every_position_finds(pieces):
    line = "".join(pieces)
    where = RULES.starts.candidates(line)
    for (pattern, _group, _before), positions in zip(RULES.partial, where, strict=True):
        if pattern is None or positions is None:
            continue
        assert first_open(_matches_at(pattern, line, positions), line) == first_open(
            every_position(pattern, line), line
        ), (
            pattern.pattern,
            line,
        )


def test_most_detectors_get_literal_starts():
    gated = [p.pattern for (p, _, _), s in zip(RULES.partial, RULES.starts.starts, strict=True) if s]
    assert len(gated) >= len(RULES.partial) // 2
    assert any(p.startswith("(?i)((?:PASSWORD") for p in gated)  # the assignment rule, the costliest


@pytest.mark.parametrize(
    ("source", "literals"),
    [
        (r"(?:A3T[A-Z0-9]|ABIA|AKIA)[0-9A-Z]{16}", {"a3t", "abia", "akia"}),
        (r"(ghp|gho)_[A-Za-z0-9_]{36}", {"ghp_", "gho_"}),
        (r"(?<![a-z])tok_[a-z]+", {"tok_"}),  # a lookbehind consumes nothing
        (r"(?:ab|[cd]e)f", {"abf", "cef", "def"}),  # a small class of literals
    ],
)
def test_literal_starts_of_patterns(source, literals):
    found = match_starts(re.compile(source, re.I if source.startswith("(?:A3T") else 0))
    assert found is not None
    assert {p.lower() for p in found.prefixes} == literals


@pytest.mark.parametrize(
    "source", [r"[0-9]{3}-SECRET", r"\w+=x", r"(?:ab|[c-z]e)f", r"a|", r"x.y", r"(?i:ab)cd"]
)
def test_no_literal_start_means_every_position(source):
    assert match_starts(re.compile(source)) is None


def test_text_whose_case_folding_differs_is_searched_everywhere():
    index = StartIndex([match_starts(re.compile(r"(?i)password[=:]\S+"))])
    assert index.candidates("x pa\u017f\u017fword=hunter22") == [None]  # the long s: re matches it as `s`
    assert index.candidates("x PASSWORD=hunter22") == [[2]]
    assert index.candidates("x pass") == [[2]]  # a literal begun at the end of the line


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_a_stream_in_pieces_masks_what_the_whole_text_masks(size):
    text = (
        "log pa\u017f\u017fword=x and PASSWORD=hunter22-long-value and ghp_"
        + "a" * 36
        + " and tok_abcdefgh and 123-SECRET end\n"
    )
    stream = StreamMasker(MASKING.text)
    data = text.encode()
    out = b"".join(stream.feed(data[i : i + size]) for i in range(0, len(data), size)) + stream.end()
    assert out.decode() == MASKING.text.mask(text)
    assert "hunter22" not in out.decode() and "tok_abcdefgh" not in out.decode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*PIECES, "é", "PaSsWoRd", "GHP_", "AWS", "Xox", "\u017f"]), max_size=30))
def test_the_hyperscan_search_finds_the_automatons_starts(pieces):
    """ASCII lines are searched by a Hyperscan literal database (exact and caseless literals), others by the
    automata: the same candidates either way."""
    line = "".join(pieces)
    assert RULES.starts.database is not None
    automata_only = StartIndex(RULES.starts.starts)
    automata_only.database = None
    assert RULES.starts.candidates(line) == automata_only.candidates(line), line
