"""What one Secret event costs the event loop in the known-values follower, with many values known.

9,000 values in 3,000 Secrets; each event changes one Secret, and the time the loop spends applying it
(`KnownSecrets._changed` and what it calls: the index's delta part, the new masker) is measured, the median
of 20 events of each kind: the same values again (a label or annotation changed: a MODIFIED event that
changes no value), and one value rotated. It runs the code it is imported with: to compare with a revision,
run it from a worktree of that revision (`PYTHONPATH=WORKTREE/.typecheck`); the code before 2026-12-08
(no `KnownSecrets._hold`) is driven through its own interface.

    .venv/bin/python bench/known_events.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from types import SimpleNamespace

from kubegate.plugins.masking import Masking, MaskingSettings
from kubegate.plugins.masking.known import KnownSecrets

SECRETS, VALUES_EACH, EVENTS = 3_000, 3, 20
INCREMENTAL = hasattr(KnownSecrets, "_hold")


def values_of(secret: int, fill: str) -> frozenset[str]:
    return frozenset(f"value-{secret}-{j}-{fill * 20}" for j in range(VALUES_EACH))


async def main() -> None:
    masking = Masking(MaskingSettings(), "bench")
    on_change = masking.known_values_changed if INCREMENTAL else masking.known_changed  # type: ignore[attr-defined]
    follower = KnownSecrets(SimpleNamespace(name="bench"), [], 8, 10_000, 4096, on_change)  # type: ignore[arg-type]

    def put(secret: int, values: frozenset[str]) -> None:
        if INCREMENTAL:
            follower._hold(f"ns/s{secret}", values)
        else:
            follower.by_secret[f"ns/s{secret}"] = set(values)  # type: ignore[assignment]

    for secret in range(SECRETS):
        put(secret, values_of(secret, "x"))
    follower._changed()
    await asyncio.sleep(3)  # the first index's literal database compiles in a worker thread
    for label, fill in (
        ("the same values (a label changed)", lambda r: "x"),
        ("one value rotated", lambda r: "y"),
    ):
        took = []
        for event in range(EVENTS):
            values = values_of(event, fill(event))
            began = time.perf_counter()
            put(event, values)
            follower._changed()
            took.append(time.perf_counter() - began)
            await asyncio.sleep(0.3)  # let a rebuild the change started finish before the next
        print(f"{label}: median {statistics.median(took) * 1000:.3f} ms, max {max(took) * 1000:.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
