"""Text a caller controlled, made safe to print on an operator's terminal.

Audit records, approval records and session records carry what a caller sent: an exec command line (any
bytes but NUL), object names, a reason. Printed raw, a carriage return, an ANSI sequence (`ESC [2K`, concealed
text) or a bidi override redraws what the reviewer or auditor reads: a harmless command shown over the one
that is approved. So every line the CLIs print from a record goes through `escape_controls`.
"""

from __future__ import annotations

import re

# C0 (tab, CR, LF and ESC included), DEL and C1 controls: each can move the cursor or start a sequence.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as `\\xNN`, and every other character Python does not
    count as printable (bidi overrides and isolates, zero-width and other format characters, lone
    surrogates, line and paragraph separators, spaces other than " ", unassigned code points) as
    `\\uNNNN` or `\\UNNNNNNNN`; the rest as it is."""
    text = _CONTROLS.sub(_escaped, text)
    if text.isascii():
        return text
    return "".join(c if c.isprintable() else _unicode_escape(c) for c in text)


def _unicode_escape(c: str) -> str:
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
