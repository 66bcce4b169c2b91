"""Where the gateway spends its time on the small GET: py-spy samples `kubegate serve` under wrk load.

    .venv/bin/python bench/profile_gateway.py [--seconds 15] [--concurrency 32] [--path /api/v1/...] [--agent]
        [--full | --masking] [--time MODULE:FUNCTION,...]

Starts the stand-in upstream and a gateway (same config as bench/run.py), drives it with wrk, records with
py-spy (installed into bench/.venv-mitm when missing; needs root or ptrace rights) and prints the functions
with the most samples, by self time and by inclusive time, plus a coarse split by layer. The raw collapsed
stacks stay in bench/results/profile-*.txt. With --agent the gateway's connection is served through the
agent tunnel (bench/run.py's agent contender) and both processes are sampled at once: the gateway's stacks
in profile-*-gateway.txt, the agent's in profile-*-agent.txt, each summarized on its own. With --exec-mb N
the load is exec sessions (bench/run.py's exec stdout stream, N MB each, one after another) instead of wrk.
With --time the gateway is not sampled: the named functions (e.g. `kubegate.core.proxy:Proxy._record`) are
timed inside it by bench/probe/sitecustomize.py, and each one's calls per request and wall time per call
under the load are printed (deterministic where py-spy's nonblocking stacks tear, but with the wrapper's
0.3 µs per call).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # bench/run.py, next to this file

PY_SPY = bench.MITM_VENV / "bin" / "py-spy"

# Coarse layers, by the file a frame is in; the first that matches the innermost frames wins.
LAYERS = [
    ("asyncssh (SSH tunnel: packets, channels, AES-GCM)", ("asyncssh/",)),
    ("ssl (OpenSSL, both sides)", ("ssl.py", "sslproto.py", "_ssl")),
    (
        "kubegate (proxy, plugins, headers; the agent's forwarder)",
        (
            "kubegate/",
            "/core/",
            "/plugins/",
            "/connections/",
            "(core/",
            "(plugins/",
            "(connections/",
            "(agent/",
        ),
    ),
    ("hypercorn + h11 (client side HTTP)", ("hypercorn/", "h11/", "h2/", "wsproto/")),
    ("aiohttp (gateway: upstream client; agent: server and client)", ("aiohttp/", "multidict", "yarl/")),
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
    parser.add_argument(
        "--agent", action="store_true", help="through the agent tunnel: sample the gateway and the agent"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the gateway-full contender: policy, approvals, masking, audit-db, recording on",
    )
    parser.add_argument(
        "--masking", action="store_true", help="the static-tokens gateway with only the masking plugin added"
    )
    parser.add_argument(
        "--time",
        default="",
        metavar="MODULE:FUNCTION,...",
        help="time these functions inside the gateway (bench/probe) instead of sampling it",
    )
    parser.add_argument(
        "--exec-mb", type=int, default=0, metavar="N", help="load: exec sessions of N MB of stdout, not wrk"
    )
    args = parser.parse_args()
    if args.time:
        return time_functions(args)
    if not PY_SPY.exists():
        bench.ensure_tools(["mitmproxy"])
        subprocess.run([str(bench.MITM_VENV / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    bench.ensure_tools(["direct"])
    work = Path(tempfile.mkdtemp(prefix="kubegate-profile-"))
    bench.RESULTS.mkdir(exist_ok=True)
    stamp = f"profile-{dt.datetime.now():%Y%m%d-%H%M%S}"
    outs = {"gateway": bench.RESULTS / f"{stamp}{'-gateway' if args.agent else ''}.txt"}
    if args.agent:
        outs["agent"] = bench.RESULTS / f"{stamp}-agent.txt"
    try:
        up = bench.start_upstream(work)
        gw = bench.start_gateway(
            work,
            up,
            label="agent" if args.agent else "gateway",
            agent=args.agent,
            full=args.full,
            masking=args.masking,
        )
        assert gw.proc is not None
        pids = {"gateway": gw.proc.pid}
        if gw.agent_proc is not None:
            pids["agent"] = gw.agent_proc.pid
        result: dict = {}
        if args.exec_mb:
            load = threading.Thread(
                target=lambda: result.update(exec_load(gw, args.exec_mb, args.seconds + 2))
            )
        else:
            bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, 2)  # warm-up
            load = threading.Thread(
                target=lambda: result.update(
                    bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, args.seconds + 2)
                )
            )
        load.start()
        spies = {
            name: subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(outs[name]),
                    "--function",
                    *(["--native"] if args.native else ["--nonblocking"]),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, pid in pids.items()
        }
        failures = []
        for name, spy in spies.items():
            _, err = spy.communicate()
            if spy.returncode != 0:
                failures.append(f"py-spy ({name}) failed: {err.strip()[-1500:]}")
        load.join()
        if failures:
            raise bench.BenchError("; ".join(failures))
    finally:
        bench.PROCS.stop_all()
        bench.shutil.rmtree(work, ignore_errors=True)
    where = ", ".join(str(out) for out in outs.values())
    if args.exec_mb:
        rate = result.get("bytes", 0) / max(result.get("seconds", 1), 1e-9) / bench.MB
        print(f"exec {args.exec_mb} MB sessions: {rate:,.1f} MB/s while sampled; stacks in {where}")
    else:
        rps = result.get("requests", 0) / max(result.get("duration_us", 1) / 1e6, 1e-9)
        print(f"wrk c={args.concurrency} {args.path}: {rps:,.0f} req/s while sampled; stacks in {where}")
    status = 0
    for name, out in outs.items():
        if len(outs) > 1:
            print(f"\n== {name} process ==")
        status |= summarize(out, args.top)
    return status


def time_functions(args: argparse.Namespace) -> int:
    """--time: the gateway with bench/probe on its import path, wrk for --seconds, the probe's totals per
    request (the totals are read before and after the load, so start-up and warm-up calls are left out)."""
    bench.ensure_tools(["direct"])
    work = Path(tempfile.mkdtemp(prefix="kubegate-probe-"))
    out = work / "probe.json"
    probe_dir = str(Path(__file__).resolve().parent / "probe")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [probe_dir, os.environ.get("PYTHONPATH", "")]))
    os.environ["KUBEGATE_BENCH_PROBE"], os.environ["KUBEGATE_BENCH_PROBE_OUT"] = args.time, str(out)
    try:
        up = bench.start_upstream(work)
        gw = bench.start_gateway(work, up, full=args.full, masking=args.masking)
        bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, 2)  # warm-up
        time.sleep(1)  # the probe writes its totals every half second
        before = json.loads(out.read_text())
        result = bench.run_wrk(gw.url(args.path), gw.token, args.concurrency, args.seconds)
        time.sleep(1)
        after = json.loads(out.read_text())
    finally:
        bench.PROCS.stop_all()
        bench.shutil.rmtree(work, ignore_errors=True)
    requests = max(result.get("requests", 0), 1)
    rps = result.get("requests", 0) / max(result.get("duration_us", 1) / 1e6, 1e-9)
    print(f"wrk c={args.concurrency} {args.path}: {rps:,.0f} req/s while timed ({requests} requests)\n")
    print("| function | calls per request | µs per call (wall, under load) | µs per request |")
    print("| --- | ---: | ---: | ---: |")
    for spec in args.time.split(","):
        spec = spec.strip()
        calls, seconds = (a - b for a, b in zip(after["totals"].get(spec, [0, 0.0]),
                                                 before["totals"].get(spec, [0, 0.0]), strict=True))  # fmt: skip
        per_call = seconds / calls * 1e6 if calls else 0.0
        print(f"| `{spec}` | {calls / requests:.2f} | {per_call:.1f} | {seconds / requests * 1e6:.1f} |")
    for spec, error in {**after["errors"], **{spec: "never imported" for spec in after["pending"]}}.items():
        print(f"{spec}: {error}", file=sys.stderr)
    return 1 if after["errors"] or after["pending"] else 0


def exec_load(target: bench.Target, megabytes: int, seconds: float) -> dict:
    """Exec sessions of `megabytes` back to back for `seconds`: bytes and seconds spent in them."""
    url = target.url(bench.POD_PATH)
    done, spent = 0, 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        elapsed, got = bench.asyncio.run(bench.exec_once(url, target.token, megabytes * bench.MB, 120))
        done, spent = done + got, spent + elapsed
    return {"bytes": done, "seconds": spent}


def summarize(out: Path, top: int) -> int:
    """Print the layers, self time and inclusive time of one raw py-spy recording."""
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
    for frame, count in self_time.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("\nby inclusive time:")
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
