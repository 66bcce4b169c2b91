"""How long one Secret change freezes the gateway's event loop, with many known values (issue 15).

The masking plugin follows the cluster's Secrets and masks their values wherever they show up. Each Secret
event used to rebuild the whole index of value forms on the event loop (`Masking.set_known`, kept as the
baseline here); now the change goes through `Masking.known_changed` (`KnownIndex`: an added value goes into
a small delta part at once, removals and a grown delta rebuild the base in a worker thread, a re-list with
the same values rebuilds nothing). Measured in one process, side by side, in rounds: a ticker coroutine
records the longest gap between its wake-ups (the event-loop stall a request would have waited through),
while one change of each kind is applied:

- add: one new Secret value;  remove: one Secret deleted;  relist: the same values again (a watch that
  expired and was re-listed);  burst: 50 Secrets added one event at a time, then 50 deleted.

    .venv/bin/python bench/known_values.py [--values 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubegate.plugins.masking import Masking, MaskingSettings


async def longest_stall(change: Callable[[], None], masking: Masking, settle: float = 0.05) -> float:
    """The longest time the loop did not run the ticker while `change` ran and any rebuild it started."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(settle)
    gaps.clear()
    change()
    await asyncio.sleep(0)
    rebuild = masking.known_index._rebuild
    if rebuild is not None and not rebuild.done():
        await rebuild
    await asyncio.sleep(settle)
    stop.set()
    await task
    return max(gaps)


def values(count: int, prefix: str = "s3cret-value") -> set[str]:
    return {f"{prefix}-{i:05d}-{'q' * 24}" for i in range(count)}


WAYS = ("rebuild on the loop (before)", "KnownIndex (now)")


async def one_way(way: str, base: set[str], burst: set[str]) -> dict[tuple[str, str], float]:
    masking = Masking(MaskingSettings())
    masking.set_known(base)
    apply = masking.set_known if way == WAYS[0] else masking.known_changed
    extra = "one-more-secret-value-x"
    out = {
        ("add", way): await longest_stall(lambda: apply(base | {extra}), masking),
        ("remove", way): await longest_stall(lambda: apply(set(base)), masking),
        ("relist", way): await longest_stall(lambda: apply(set(base)), masking),
    }

    def burst_of_events() -> None:
        wanted = set(base)
        for value in sorted(burst):
            wanted.add(value)
            apply(set(wanted))
        for value in sorted(burst):
            wanted.discard(value)
            apply(set(wanted))

    started = time.perf_counter()
    out[("burst of 100 events", way)] = await longest_stall(burst_of_events, masking)
    out[("burst of 100 events: until settled", way)] = time.perf_counter() - started
    # what is masked at the end is the same either way: the base values, not the burst's (deleted) ones
    assert masking.text.mask("burst-secret-00007-" + "q" * 24) == "burst-secret-00007-" + "q" * 24
    assert masking.text.mask(sorted(base)[5]) == masking.settings.marker
    return out


async def one_round(count: int) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for way in WAYS:
        out |= await one_way(way, values(count), values(50, "burst-secret"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=10_000, help="known values (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [asyncio.run(one_round(args.values)) for _ in range(args.rounds)]
    print(f"{args.values:,} known values, {args.rounds} rounds; longest event-loop stall (median, min-max)\n")
    print("| change | rebuild on the loop (before) | KnownIndex (now) |")
    print("| --- | ---: | ---: |")
    for change in ("add", "remove", "relist", "burst of 100 events", "burst of 100 events: until settled"):
        cells = []
        for way in WAYS:
            ms = [r[(change, way)] * 1e3 for r in rounds]
            cells.append(f"{statistics.median(ms):,.1f} ms ({min(ms):,.1f}-{max(ms):,.1f})")
        print(f"| {change} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
