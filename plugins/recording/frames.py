"""The remote-command channel protocols as far as a recording needs them: which channel a WebSocket message
is on, terminal sizes, and the exit status the API server sends at the end.

Binary protocols (``v5.channel.k8s.io``, ``v4.channel.k8s.io``, ``channel.k8s.io``): the first byte is the
channel — 0 stdin, 1 stdout, 2 stderr, 3 status/error, 4 resize; v5 adds ``0xFF <channel>``, "the client
closed that stream", which carries no data. The base64 variants send text messages: the channel as an ASCII
digit, then the payload in base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

STDIN, STDOUT, STDERR, STATUS, RESIZE = 0, 1, 2, 3, 4
CLOSE_STREAM = 0xFF
_EXIT_CODE_TEXT = re.compile(r"exit code:? (\d+)")


def split_frame(data: bytes, text: bool) -> tuple[int, bytes] | None:
    """(channel, payload) of one message, or None for a v5 close frame or something unreadable."""
    if not data:
        return None
    if text:
        channel = data[0] - ord("0")
        if not 0 <= channel <= 9:
            return None
        try:
            return channel, base64.b64decode(data[1:])
        except (binascii.Error, ValueError):
            return None
    if data[0] == CLOSE_STREAM:
        return None
    return data[0], data[1:]


def parse_resize(payload: bytes) -> list[tuple[int, int]]:
    """Terminal sizes in a resize message: ``{"Width":W,"Height":H}``, possibly several back to back."""
    sizes = []
    text = payload.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    index = 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        try:
            doc, index = decoder.raw_decode(text, index)
        except ValueError:
            break
        if isinstance(doc, dict):
            width, height = doc.get("Width"), doc.get("Height")
            if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
                sizes.append((width, height))
    return sizes


def exit_status(payload: bytes) -> tuple[int | None, str]:
    """(exit code, reason) from what the status channel carried over the whole session.

    v4/v5 send one ``metav1.Status``: ``Success`` → 0; a ``NonZeroExitCode`` failure carries the code in
    ``details.causes[{reason: ExitCode, message: "3"}]``; another failure (the command could not start, the
    container is gone) has no code, only its message. The older protocols send a plain-text error and
    nothing at all on success.
    """
    text = payload.decode("utf-8", "replace").strip()
    if not text:
        return None, ""
    try:
        doc = json.loads(text)
    except ValueError:
        match = _EXIT_CODE_TEXT.search(text)
        return (int(match.group(1)) if match else None), text[:1000]
    if not isinstance(doc, dict):
        return None, text[:1000]
    if doc.get("status") == "Success":
        return 0, ""
    reason = str(doc.get("message") or doc.get("reason") or "Failure")[:1000]
    details = doc.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else []:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            try:
                return int(str(cause.get("message", "")).strip()), reason
            except ValueError:
                break
    return None, reason
