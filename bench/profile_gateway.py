"""Where the gateway spends its time on the small GET: py-spy samples `kubegate serve` under wrk load.

    .venv/bin/python bench/profile_gateway.py [--seconds 15] [--concurrency 32] [--path /api/v1/...]

Starts the stand-in upstream and a gateway (same config as bench/run.py), drives it with wrk, records with
py-spy (installed into bench/.venv-mitm when missing; needs root or ptrace rights) and prints the functions
with the most samples, by self time and by inclusive time, plus a coarse split by layer. The raw collapsed
stacks stay in bench/results/profile-*.txt.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # bench/run.py, next to this file

PY_SPY = bench.MITM_VENV / "bin" / "py-spy"

# Coarse layers, by the file a frame is in; the first that matches the innermost frames wins.
LAYERS = [
    ("ssl (OpenSSL, both sides)", ("ssl.py", "sslproto.py", "_ssl")),
    ("kubegate (proxy, plugins, headers)", ("kubegate/", "/core/", "/plugins/", "/connections/")),
    ("hypercorn + h11 (client side HTTP)", ("hypercorn/", "h11/", "h2/", "wsproto/")),
    ("aiohttp client (upstream side HTTP)", ("aiohttp/", "multidict", "yarl/")),
    ("pluggy", ("pluggy/",)),
    ("asyncio / uvloop", ("asyncio/", "uvloop/")),
]


def layer_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--path", default=bench.POD_PATH)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--native", action="store_true", help="also sample C frames (OpenSSL, uvloop)")
    args = parser.parse_args()
    if not PY_SPY.exists():
        bench.ensure_tools(["mitmproxy"])
        subprocess.run([str(bench.MITM_VENV / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    bench.ensure_tools(["direct"])
    work = Path(tempfile.mkdtemp(prefix="kubegate-profile-"))
    bench.RESULTS.mkdir(exist_ok=True)
    out = bench.RESULTS / f"profile-{dt.datetime.now():%Y%m%d-%H%M%S}.txt"
    try:
        up = bench.start_upstream(work)
        gw = bench.start_gateway(work, up)
        assert gw.proc is not None
        bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, 2)  # warm-up
        result: dict = {}
        load = threading.Thread(
            target=lambda: result.update(
                bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, args.seconds + 2)
            )
        )
        load.start()
        spy = subprocess.run(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(gw.proc.pid),
                "--duration",
                str(args.seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(out),
                "--function",
                *(["--native"] if args.native else ["--nonblocking"]),
            ],
            capture_output=True,
            text=True,
        )
        load.join()
        if spy.returncode != 0:
            raise bench.BenchError(f"py-spy failed: {spy.stderr.strip()[-1500:]}")
    finally:
        bench.PROCS.stop_all()
        bench.shutil.rmtree(work, ignore_errors=True)
    rps = result.get("requests", 0) / max(result.get("duration_us", 1) / 1e6, 1e-9)
    print(f"wrk c={args.concurrency} {args.path}: {rps:,.0f} req/s while sampled; stacks in {out}")
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        total += count
        self_time[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
        layers[layer_of(stack)] += count
    if not total:
        print("no samples")
        return 1
    print(f"\n{total} samples; by layer (innermost matching frame):")
    for name, count in layers.most_common():
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\nby self time:")
    for frame, count in self_time.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("\nby inclusive time:")
    for frame, count in inclusive.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
