"""Helpers shared by the recording tests (directory/database storage and S3)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace


def fake_session(**values):
    base = {"ended": time.time(), "bytes_from_client": 10, "bytes_from_upstream": 20, "close_code": 1000}
    return SimpleNamespace(**(base | values))


def status_frame(code: int) -> bytes:
    doc = {"status": "Failure", "reason": "NonZeroExitCode",
           "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}  # fmt: skip
    return b"\x03" + json.dumps(doc).encode()
