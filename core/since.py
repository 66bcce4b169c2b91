"""`--since` / `?since=` (sessions, audit): a duration back from now (`90s`, `30m`, `1h`, `2d`, `1w`) or a point in time
(ISO 8601: `2025-03-01`, `2025-03-01T14:00`, `2025-03-01T14:00:00Z`; without a zone it is local time)."""

from __future__ import annotations

import re
import time
from datetime import datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SinceError(ValueError):
    """Not a duration or a time; the message shows what is accepted."""


def parse_since(text: str, now: float | None = None) -> float:
    """The Unix time `text` means."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _SECONDS[match.group(2)]
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SinceError(
            f"since {text!r}: give a duration (30m, 1h, 2d) or a time (2025-03-01T14:00, ISO 8601)"
        ) from None
    return moment.timestamp()  # naive: local time, as the user's clock shows it
