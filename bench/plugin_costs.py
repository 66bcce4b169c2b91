"""What each plugin of the full chain costs: the small GET through the static-tokens gateway, gateway-full,
and gateway-full without one plugin at a time, side by side in rounds; and the CPU each process spends per
request (the gateway, its audit writer, the upstream).

This is how issue 15's remaining gap was split (docs/performance.md, "What each plugin costs"): a plugin's
cost is what the chain gains when it is left out, measured seconds apart from the chain itself.

    .venv/bin/python bench/plugin_costs.py [--rounds 3] [--duration 4] [--without masking,audit-db,...]
        [--baseline REV] [--path /api/v1/namespaces/prod/pods]

With `--baseline REV` (a git revision), gateway-full also runs as the code at REV, beside the working tree's:
what a change bought, measured in the same rounds (the old code is imported through its `.typecheck/` tree
of links, so nothing is installed).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # bench/run.py: the same processes, configs and wrk cells as the benchmark

PLUGINS = ("masking", "audit-db", "policy", "approvals", "recording")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The gateway's child processes (the audit writer)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def start_without(work: Path, full: bench.Target, plugin: str) -> bench.Target:
    """gateway-full's config with `plugin` left out, on a port and state directory of its own."""
    text = (work / "gateway-full" / "kubegate.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.strip().startswith(f"{plugin}:")]
    port = bench.free_port()
    gdir = work / f"without-{plugin}"
    gdir.mkdir()
    config = re.sub(r"^listen: \S+", f"listen: 127.0.0.1:{port}", "\n".join(lines) + "\n", flags=re.M)
    config = config.replace(str(work / "gateway-full" / "state"), str(gdir / "state"))
    (gdir / "kubegate.yaml").write_text(config)
    label = f"full-{plugin}"
    proc = bench.start_kubegate_serve(label, gdir / "kubegate.yaml", gdir / "gateway.log", gdir)
    target = bench.Target(
        label, f"https://127.0.0.1:{port}/k8s/{bench.CONNECTION}", full.token, proc, masks=True
    )
    bench.wait_ready(label, proc, target.url(bench.POD_PATH), target.token, gdir / "gateway.log")
    return target


def start_baseline(work: Path, full: bench.Target, revision: str) -> bench.Target:
    """gateway-full's config served by the code at `revision` (git archive of it, imported through its
    `.typecheck/` links), on a port and state directory of its own."""
    imports = bench.checkout_revision(revision, work / "baseline-src")
    text = (work / "gateway-full" / "kubegate.yaml").read_text()
    port = bench.free_port()
    gdir = work / "baseline"
    gdir.mkdir()
    config = re.sub(r"^listen: \S+", f"listen: 127.0.0.1:{port}", text, flags=re.M)
    config = config.replace(str(work / "gateway-full" / "state"), str(gdir / "state"))
    (gdir / "kubegate.yaml").write_text(config)
    label = f"full at {revision}"
    env = {**os.environ, "PYTHONPATH": str(imports)}  # the audit writer process inherits it
    argv = [sys.executable, "-m", "kubegate.core.cli", "serve", "--config", str(gdir / "kubegate.yaml")]
    proc = bench.PROCS.start(label, argv, gdir / "gateway.log", cwd=str(gdir), env=env)
    target = bench.Target(
        label, f"https://127.0.0.1:{port}/k8s/{bench.CONNECTION}", full.token, proc, masks=True
    )
    bench.wait_ready(label, proc, target.url(bench.POD_PATH), target.token, gdir / "gateway.log")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="seconds per cell")
    parser.add_argument("--without", default=",".join(PLUGINS), help="plugins to leave out, one at a time")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--baseline", metavar="REV", help="also run gateway-full as the code at this git revision"
    )
    parser.add_argument(
        "--path",
        default=bench.POD_PATH,
        help=f"what to GET (default: one Pod; the 500-Pod list: {bench.LIST_PATH})",
    )
    bench.add_wait_quiet(parser)
    args = parser.parse_args()
    if args.wait_quiet:
        bench.say(f"busy share of other processes at start: {bench.wait_until_quiet(args.wait_quiet):.0%}")
    work = Path(tempfile.mkdtemp(prefix="kubegate-plugin-costs-"))
    rps: dict[tuple[str, int], list[float]] = {}
    p50: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int, str], list[float]] = {}
    try:
        up = bench.start_upstream(work)
        targets = {
            "gateway": bench.start_gateway(work, up, label="gateway"),
            "gateway-full": bench.start_gateway(work, up, label="gateway-full", full=True),
        }
        if args.baseline:
            targets[f"full at {args.baseline}"] = start_baseline(work, targets["gateway-full"], args.baseline)
        for plugin in [p for p in args.without.split(",") if p]:
            targets[f"full without {plugin}"] = start_without(work, targets["gateway-full"], plugin)
        for round_ in range(args.rounds):
            bench.say(f"round {round_ + 1} of {args.rounds}")
            for conc in args.concurrency:
                for name, target in targets.items():
                    pids = {"gateway": target.proc.pid, "upstream": up.proc.pid}
                    for child in children_of(target.proc.pid):  # audit-db's writer: the one child
                        pids["audit writer"] = child
                    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                    started = time.monotonic()
                    out = bench.run_wrk(target.url(args.path), target.token, conc, args.duration)
                    elapsed = time.monotonic() - started
                    requests = max(out["requests"], 1)
                    rps[name, conc] = [
                        *rps.get((name, conc), []),
                        out["requests"] / (out["duration_us"] / 1e6),
                    ]
                    p50[name, conc] = [*p50.get((name, conc), []), out["p50_us"] / 1000]
                    for role, pid in pids.items():
                        spent = cpu_seconds(pid) - before[role]
                        cpu.setdefault((name, conc, role), []).append(spent / requests * 1e6)
                    bench.say(f"  {name:24} c={conc:<3} {rps[name, conc][-1]:7.0f} req/s ({elapsed:.1f} s)")
    finally:
        bench.PROCS.stop_all()
        bench.shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| contender | conc. | req/s | / gateway-full | p50 ms | gateway CPU µs/request | audit writer µs/request "
        "| upstream µs/request |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for conc in args.concurrency:
        full_rps = statistics.median(rps["gateway-full", conc])
        for name in targets:
            median = statistics.median(rps[name, conc])
            cells = [
                f"{statistics.median(cpu[name, conc, role]):.0f}" if (name, conc, role) in cpu else "—"
                for role in ("gateway", "audit writer", "upstream")
            ]
            print(
                f"| {name} | {conc} | {median:,.0f} | {median / full_rps:.2f}x "
                f"| {statistics.median(p50[name, conc]):.2f} | {' | '.join(cells)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
