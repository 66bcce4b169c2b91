"""`core.terminal.escape_controls`: what a caller sent, printed on an operator's terminal, cannot move the
cursor, start an escape sequence or reorder the text; everything else is printed as it is."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from kubegate.core.terminal import escape_controls


def test_controls_and_format_characters_are_written_out():
    assert escape_controls("a\r\x1b[2Kb\tc\n\x7f\x9b") == "a\\x0d\\x1b[2Kb\\x09c\\x0a\\x7f\\x9b"
    assert escape_controls("\u202eevil\u2066\u200b\ufeff") == "\\u202eevil\\u2066\\u200b\\ufeff"
    assert escape_controls("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    assert (
        escape_controls("kubectl get pods -n prod — déjà vu 日本")
        == "kubectl get pods -n prod — déjà vu 日本"
    )


@given(st.text())
def test_nothing_a_terminal_acts_on_survives(text):
    out = escape_controls(text)
    for c in out:
        assert c.isprintable() or c == " ", repr(c)
        assert unicodedata.category(c) not in ("Cc", "Cf", "Cs")
