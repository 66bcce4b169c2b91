"""The `audit-stdout` plugin: one JSON line per audit event on standard output (for a log collector that
reads the container's output). No chain: the collector's store is where tamper evidence must live."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from .sink import SinkPlugin, SinkSettings, SinkWriter

if TYPE_CHECKING:
    pass

PLUGIN_NAME = "audit-stdout"


class StdoutSink(SinkWriter):
    name = "audit-stdout"

    def write(self, batch: list[dict[str, Any]]) -> None:
        sys.stdout.write(
            "".join(json.dumps({"audit": r}, separators=(",", ":"), default=str) + "\n" for r in batch)
        )
        sys.stdout.flush()


PLUGIN = SinkPlugin(
    PLUGIN_NAME, __name__, SinkSettings, lambda gateway, settings: StdoutSink(settings or SinkSettings())
)
