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


class MaskedStream:
    """What the masking plugin gives the recorder for each stream (`kubegate_record_stream`), without a
    flow: the default rules and one known value, `hunter2-s3cret`, masked as `<masked>`."""

    def __init__(self, known: frozenset[str] = frozenset({"hunter2-s3cret"})):
        from kubegate.plugins.masking import Masking, MaskingSettings
        from kubegate.plugins.masking.stream import StreamMasker

        masking = Masking(MaskingSettings(marker="<masked>"))
        masking.set_known(set(known))
        self.stream = StreamMasker(masking.text, masking.settings.max_secret_bytes)

    def feed(self, chunk: bytes) -> bytes:
        return self.stream.feed(chunk)

    def end(self) -> bytes:
        return self.stream.close()
