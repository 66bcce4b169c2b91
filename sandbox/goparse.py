"""How a Go API server reads a request URL: the sandbox's own, deliberately separate, implementation.

The gateway has its reading in `kubegate.core.attributes`; the sandbox must not share it, or a test that
compares what the gateway decided with what the sandbox acted on would compare one implementation with
itself. Like the real API server (and unlike the gateway, which refuses them), the sandbox silently drops
the query pairs Go drops: a pair holding `;`, a pair with a bad `%` escape, everything past 10000 pairs.
"""

from __future__ import annotations

import string

from multidict import MultiDict, MultiDictProxy, MultiMapping

_HEXDIGITS = set(string.hexdigits)
_MAX_PAIRS = 10000  # net/url: more pairs than this and ParseQuery returns no values at all


class BadEscape(Exception):
    """net/url EscapeError: a `%` not followed by two hex digits."""


def _percent_decode(text: str, plus_means_space: bool) -> str:
    # net/url unescape over bytes: `text` carries one byte per character (latin-1); the result is UTF-8
    # with undecodable bytes replaced (a real API server keeps them as bytes; clients send UTF-8).
    raw = text.encode("latin-1", errors="replace")
    buf = bytearray()
    pos = 0
    while pos < len(raw):
        ch = raw[pos : pos + 1]
        if ch == b"%":
            digits = raw[pos + 1 : pos + 3].decode("latin-1")
            if len(digits) < 2 or not set(digits) <= _HEXDIGITS:
                raise BadEscape(raw[pos : pos + 3].decode("latin-1"))
            buf += bytes([int(digits, 16)])
            pos += 3
        elif ch == b"+" and plus_means_space:
            buf += b" "
            pos += 1
        else:
            buf += ch
            pos += 1
    return buf.decode("utf-8", errors="replace")


def go_query(raw_query: str) -> MultiDictProxy[str]:
    """url.ParseQuery(raw_query), errors ignored (`req.URL.Query()`): values of a key in arrival order."""
    out: MultiDict[str] = MultiDict()
    if not raw_query or raw_query.count("&") >= _MAX_PAIRS:
        return MultiDictProxy(out)
    for chunk in raw_query.split("&"):
        if ";" in chunk or chunk == "":
            continue
        key, _sep, value = chunk.partition("=")
        try:
            out.add(_percent_decode(key, True), _percent_decode(value, True))
        except BadEscape:
            continue
    return MultiDictProxy(out)


def go_path(raw_path: str) -> str:
    """url.PathUnescape of the request path (a `+` stays a `+`). Raises BadEscape like Go's server (400)."""
    return _percent_decode(raw_path, False)


def go_bool(query: MultiMapping[str], key: str) -> bool:
    """runtime.Convert_Slice_string_To_bool on the first value: only absent, "0" and "false" (any case,
    Unicode simple folding) are false."""
    if key not in query:
        return False
    first = query.getall(key)[0]
    if first == "0":
        return False
    folded = first.replace("\u017f", "s")
    return not (len(folded) == 5 and folded.casefold() == "false" and folded.isascii())


def selector_terms(selector: str) -> list[tuple[str, str, str]] | None:
    """fields.ParseSelector: (field, operator, value) terms in Go's order, or None when it does not parse.
    Terms split on unescaped `,`, are sorted, split at the first `!=`/`==`/`=` (nothing trimmed); values
    unescape `\\\\`, `\\,` and `\\=` and may hold no bare `,` or `=`."""
    if not selector:
        return []
    pieces: list[str] = []
    current = ""
    escaped = False
    for ch in selector:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            pieces.append(current)
            current = ""
            continue
        current += ch
    pieces.append(current)
    terms = []
    for piece in sorted(pieces):
        if not piece:
            continue
        cut = _first_operator(piece)
        if cut is None:
            return None
        field, op, value = cut
        plain = _unescape_selector_value(value)
        if plain is None:
            return None
        terms.append((field, op, plain))
    return terms


def exact_name(selector: str) -> tuple[bool, str | None]:
    """fields.ParseSelector(selector).RequiresExactMatch("metadata.name"): (parsed, name or None)."""
    terms = selector_terms(selector)
    if terms is None:
        return False, None
    return True, next((v for f, op, v in terms if f == "metadata.name" and op != "!="), None)


def _first_operator(term: str) -> tuple[str, str, str] | None:
    for at in range(len(term)):
        rest = term[at:]
        for op in ("!=", "==", "="):
            if rest.startswith(op):
                return term[:at], op, rest[len(op) :]
    return None


def _unescape_selector_value(value: str) -> str | None:
    result = ""
    pending = False
    for ch in value:
        if pending:
            if ch not in ("\\", ",", "="):
                return None
            result += ch
            pending = False
        elif ch == "\\":
            pending = True
        elif ch in (",", "="):
            return None
        else:
            result += ch
    return None if pending else result


def valid_segment_name(name: str) -> bool:
    """validation/path.IsValidPathSegmentName."""
    return not (name in (".", "..") or any(bad in name for bad in ("/", "%")))
