#!/usr/bin/env python3
"""What the audit-db writer spends per event: CPU (user + system) of `store.write` in one process.

    .venv/bin/python bench/audit_writer.py [--rounds 5] [--events 10000] [--batch 50] [--baseline REV ...]

Each round writes `--events` request events (the shape gateway-full records for a small GET) in batches of
`--batch` (what `linger_ms` gathers at about 1,000 requests/s) into a fresh SQLite database, as the writer
process does: chain, canonical text, columns, insert, commit. With `--baseline REV` (repeatable) the code at that git
revision (imported through its `.typecheck/` tree) runs in the same rounds, interleaved. Medians of the
rounds. A benchmark, not a test: nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # bench/run.py, next to this file: checkout_revision

MEASURE = r"""
import json, os, sys, time, uuid
from kubegate.core.db import Database, import_models
from kubegate.plugins.audit import store

events, batch, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def event():
    return {"id": uuid.uuid4().hex, "time": time.time(), "kind": "request", "connection": "bench",
            "request_id": uuid.uuid4().hex,
            "data": {"request_id": uuid.uuid4().hex, "method": "GET", "path": "/api/v1/namespaces/prod/pods/web",
                     "query": "", "source": "127.0.0.1", "user_agent": "wrk", "kubectl_command": None,
                     "kubectl_session": None,
                     "attributes": {"verb": "get", "api_group": "", "api_version": "v1", "resource": "pods",
                                    "subresource": "", "namespace": "prod", "name": "web",
                                    "is_resource_request": True},
                     "identity": {"user": "alice", "person": "alice", "groups": ["developers"],
                                  "method": "static-tokens", "issuer": None, "claims": {}},
                     "decision": {"verdict": "allow", "reason": "", "rule": "read-anything"},
                     "policy": None, "approval": None,
                     "masking": {"mode": "mask", "form": "json", "encoding": "", "content_type": "application/json"},
                     "status": 200, "bytes": 2291, "latency_ms": 1.234, "error": None}}

import_models()
database = Database(f"sqlite:///{path}")
database.create_tables()
batches = [[event() for _ in range(batch)] for _ in range(events // batch)]
store.write(database, batches[0], None)  # the first transaction opens the file and warms the caches
before = os.times()
for records in batches[1:]:
    store.write(database, records, None)
after = os.times()
written = events - batch
print(json.dumps({"cpu_us": ((after.user - before.user) + (after.system - before.system)) / written * 1e6,
                  "sys_us": (after.system - before.system) / written * 1e6}))
"""


def measure(pythonpath: str | None, events: int, batch: int, work: Path) -> dict[str, float]:
    database = Path(tempfile.mkdtemp(dir=work)) / "audit.db"
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(events), str(batch), str(database)],
                         capture_output=True, text=True, env=env, cwd=work)  # fmt: skip
    if out.returncode != 0:
        sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "the measurement failed")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--baseline", metavar="REV", action="append", default=[],
                        help="also measure the code at this git revision (repeatable)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubegate-audit-writer-") as scratch:
        work = Path(scratch)
        contenders: dict[str, str | None] = {"working tree": None}
        for index, revision in enumerate(args.baseline):
            try:
                contenders[f"at {revision}"] = str(
                    bench.checkout_revision(revision, work / f"baseline-{index}")
                )
            except bench.BenchError as exc:
                sys.exit(str(exc))
        results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        for round_no in range(args.rounds):
            for name, pythonpath in contenders.items():
                results[name].append(measure(pythonpath, args.events, args.batch, work))
                print(f"round {round_no + 1}: {name}: {results[name][-1]['cpu_us']:.1f} µs/event", flush=True)
    print(f"\nCPU per event (user + system), median of {args.rounds} rounds of {args.events:,} events in batches "
          f"of {args.batch}:")  # fmt: skip
    for name, rounds in results.items():
        cpu = [r["cpu_us"] for r in rounds]
        system = statistics.median(r["sys_us"] for r in rounds)
        print(
            f"  {name}: {statistics.median(cpu):.1f} µs ({min(cpu):.1f}-{max(cpu):.1f}; system {system:.1f})"
        )


if __name__ == "__main__":
    main()
