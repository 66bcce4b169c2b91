"""exec/log output without newlines through the stream masker: every position tried (before) vs the literal
starts of each pattern (now), side by side in rounds, in one process (issue 15).

A stream is masked as it passes; for a pattern match that may still be in progress at the end of the
unfinished line, the partial search used to try each detector's regex at every position of that line, for
every frame (about 30 ms per 32 KB frame of base64: 1-5 MB/s). plugins/masking/starts.py tries a pattern only
where one of its literal beginnings occurs.

    .venv/bin/python bench/stream_masking.py [--megabytes 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubegate.plugins.masking import Masking, MaskingSettings
from kubegate.plugins.masking.starts import StartIndex
from kubegate.plugins.masking.stream import StreamMasker, _rules

FRAME = 32 * 1024


def throughput(masking: Masking, frames: list[bytes], every_position: bool) -> tuple[float, bytes]:
    rules = _rules(masking.text)
    gated = rules.starts
    if every_position:
        rules.starts = StartIndex([None] * len(rules.partial))
    try:
        stream = StreamMasker(masking.text)
        started = time.perf_counter()
        out = b"".join(stream.feed(frame) for frame in frames) + stream.end()
        seconds = time.perf_counter() - started
    finally:
        rules.starts = gated
    return sum(map(len, frames)) / seconds / 1e6, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    masking = Masking(MaskingSettings())
    masking.set_known({f"s3cret-value-{i:05d}-{'q' * 24}" for i in range(1000)})
    data = base64.b64encode(os.urandom(int(args.megabytes * 1024 * 1024 * 3 / 4)))  # one line, no newline
    frames = [data[i : i + FRAME] for i in range(0, len(data), FRAME)]
    results: dict[str, list[float]] = {"every position (before)": [], "literal starts (now)": []}
    for _ in range(args.rounds):
        before, out_before = throughput(masking, frames, every_position=True)
        now, out_now = throughput(masking, frames, every_position=False)
        assert out_before == out_now, "the two ways masked differently"
        results["every position (before)"].append(before)
        results["literal starts (now)"].append(now)
    print(f"{len(data) / 1e6:.1f} MB of base64 in one line, {FRAME // 1024} KB frames, {args.rounds} rounds")
    print("| partial search | MB/s (median, min-max) |\n| --- | ---: |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")


if __name__ == "__main__":
    main()
