"""Wall time per call of chosen functions inside a running `kubegate serve` (bench/profile_gateway.py --time).

Python imports this module at start when bench/probe is on PYTHONPATH; it does nothing unless
KUBEGATE_BENCH_PROBE names functions (`module:Qualified.name,...`) and the process is `kubegate serve`. A
thread waits until the modules import, replaces each function (or method) with a wrapper that adds up its
calls and wall time (a coroutine function: from the call to its return, waits included), and writes the
totals as JSON to KUBEGATE_BENCH_PROBE_OUT every half second. Only functions looked up at call time are
seen: a hook implementation pluggy already holds is not, the functions it calls are. The wrapper adds about
0.3 µs per call. Not a test, not shipped: a bench tool.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
from typing import Any


def _wrap(spec: str, totals: dict[str, list[float]]) -> None:
    module_name, _, qualname = spec.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    total = totals.setdefault(spec, [0, 0.0])
    clock = time.perf_counter
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await original(*args, **kwargs)
            finally:
                total[0] += 1
                total[1] += clock() - start

        setattr(owner, name, timed_async)
    else:

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                total[0] += 1
                total[1] += clock() - start

        setattr(owner, name, timed)


def _run(specs: list[str], out: str) -> None:
    totals: dict[str, list[float]] = {}
    pending = list(specs)
    errors: dict[str, str] = {}
    while True:
        for spec in list(pending):
            try:
                _wrap(spec, totals)
                pending.remove(spec)
            except ImportError:
                continue  # not imported yet (the gateway is still starting)
            except Exception as exc:  # a name that does not exist: reported, not retried
                errors[spec] = f"{type(exc).__name__}: {exc}"
                pending.remove(spec)
        partial = f"{out}.partial"
        with open(partial, "w") as file:
            json.dump({"totals": totals, "errors": errors, "pending": pending}, file)
        os.replace(partial, out)
        time.sleep(0.5)


if os.environ.get("KUBEGATE_BENCH_PROBE") and "serve" in sys.argv:
    _specs = [spec.strip() for spec in os.environ["KUBEGATE_BENCH_PROBE"].split(",") if spec.strip()]
    _out = os.environ.get("KUBEGATE_BENCH_PROBE_OUT", f"/tmp/kubegate-probe-{os.getpid()}.json")
    threading.Thread(target=_run, args=(_specs, _out), daemon=True, name="bench probe").start()
