"""What watching for the client's disconnect costs a short REST request, in process: nothing (before), the
delayed watcher every forwarded request now has (a timer, cancelled when the request ends first), and a
watcher task started at once (what a stream's response without a length gets). It runs the code it is
imported with: for a revision, from a worktree with `PYTHONPATH=WORKTREE/.typecheck`.

    .venv/bin/python bench/disconnect_watch.py
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop

from kubegate.core.httpbody import WATCH_AFTER_SECONDS, DisconnectWatcher

ROUNDS, REQUESTS = 5, 50_000


async def main() -> None:
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # a client that stays
        return {"type": "http.disconnect"}

    async def watched(delay: float) -> None:
        watcher = DisconnectWatcher(receive, delay)
        await asyncio.sleep(0)  # the request's own work: at least one suspension
        watcher.stop()

    async def unwatched(_: float) -> None:
        await asyncio.sleep(0)

    cases = [("no watcher", unwatched, 0.0), (f"timer ({WATCH_AFTER_SECONDS:g} s)", watched, WATCH_AFTER_SECONDS),
             ("task at once", watched, 0.0)]  # fmt: skip
    for name, request, delay in cases:
        times = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(REQUESTS):
                await request(delay)
            times.append((time.perf_counter() - started) / REQUESTS * 1e6)
        print(f"{name}: {min(times):.2f} µs per request (best of {ROUNDS} x {REQUESTS:,})")


if __name__ == "__main__":
    uvloop.run(main())
