"""Masking cost, side by side in one run: the same gateway config with and without the `masking` plugin,
in front of the bench upstream (bench/upstream.py), which serves a 5,000-Secret list and a 64 MiB log.

    .venv/bin/python bench/masking.py [--rounds 5] [--only lists,pod,logs,keys]

Measured (medians over the rounds, plain and masked alternating):
  - GET of the 5,000-Secret list (about 2.6 MB of JSON): seconds, masked / plain (target ≤ 2x);
  - GET of a 500-Pod list (1.2 MB of JSON, nothing in it masked: the cost of inspecting and re-serializing);
  - GET of one Pod (2.3 KB of JSON, nothing masked) at concurrency 32 on kept-alive connections: requests/s
    (the small-object case of issue 15, where the masker's per-response work shows);
  - a 64 MiB pods/log stream: MB/s through each (target: masked ≥ 50 MB/s).
Not a test: nothing here asserts a timing. It prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PROCS, insecure_context, start_gateway, start_upstream

MARKER_B64 = base64.b64encode(b"<masked by kubegate>").decode()


async def fetch(url: str, token: str) -> tuple[float, int, bytes]:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                               ssl=insecure_context()) as response:  # fmt: skip
            size, head = 0, b""
            async for chunk in response.content.iter_chunked(1 << 20):
                size += len(chunk)
                if len(head) < 4096:
                    head += chunk[:4096]
            return time.perf_counter() - started, size, head


async def keystrokes(target, count: int = 200) -> list[float]:
    """Round trips of single keystrokes through an exec session whose process echoes stdin (ms)."""
    url = target.url("/api/v1/namespaces/prod/pods/web/exec?command=cat&stdin=true&stdout=true&tty=true")
    url = url.replace("https://", "wss://")
    times = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io",), ssl=insecure_context(),
                                      headers={"Authorization": f"Bearer {target.token}"}) as ws:  # fmt: skip
            for i in range(count):
                key = bytes([97 + i % 26])
                started = time.perf_counter()
                await ws.send_bytes(b"\x00" + key)
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type is aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01" and key in msg.data:
                        break
                times.append((time.perf_counter() - started) * 1000)
    return times


async def pod_rate(url: str, token: str, requests: int = 2000, concurrency: int = 32) -> float:
    """Requests per second of `requests` GETs of one small object, `concurrency` at a time."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=insecure_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm the connections
        remaining = requests
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


MEASURES = ("lists", "pod", "logs", "keys")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated measures to run (default all: {','.join(MEASURES)})")  # fmt: skip
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(MEASURES):
        parser.error(f"unknown measures: {', '.join(sorted(only - set(MEASURES)))}")
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-masking-"))
    try:
        up = start_upstream(work)
        plain = start_gateway(work, up, label="gateway-plain")
        masked = start_gateway(work, up, label="gateway-masked", masking=True)
        # The same masking with keystroke echo never held (exec_hold_from 4), for the exec latency only.
        echo = start_gateway(work, up, label="gateway-masked-echo", masking={"exec_hold_from": 4})
        time.sleep(2)  # the masking follower lists the Secrets once at start
        lists: dict[str, list[float]] = {"plain": [], "masked": []}
        pod_lists: dict[str, list[float]] = {"plain": [], "masked": []}
        kinds = {"typical": "1 line in 100 carries a secret", "worst": "every line carries two"}
        logs: dict[str, dict[str, list[float]]] = {k: {"plain": [], "masked": []} for k in kinds}
        pod_rates: dict[str, list[float]] = {"plain": [], "masked": []}
        for _ in range(args.rounds):
            for name, target in (("plain", plain), ("masked", masked)):
                if "pod" in only:
                    url = target.url("/api/v1/namespaces/prod/pods/web")
                    pod_rates[name].append(asyncio.run(pod_rate(url, target.token)))
                if "lists" in only:
                    seconds, _, head = asyncio.run(
                        fetch(target.url("/api/v1/namespaces/prod/secrets"), target.token)
                    )
                    if name == "masked":
                        assert MARKER_B64.encode() in head, "the masked list is not masked"
                    lists[name].append(seconds)
                    url = target.url("/api/v1/namespaces/prod/pods")
                    seconds, _, _ = asyncio.run(fetch(url, target.token))
                    pod_lists[name].append(seconds)
                for kind in kinds if "logs" in only else ():
                    url = target.url(f"/api/v1/namespaces/prod/pods/web/log?kind={kind}")
                    seconds, size, head = asyncio.run(fetch(url, target.token))
                    if name == "masked":
                        assert b"s3cret-value" not in head, "the masked log is not masked"
                    logs[kind][name].append(size / seconds / 1e6)
        keys = {
            name: asyncio.run(keystrokes(target))
            for name, target in (("plain", plain), ("masked", masked), ("echo", echo))
            if "keys" in only
        }
        print("| measure | plain | masked | masked / plain | target | met |")
        print("| --- | ---: | ---: | ---: | --- | --- |")
        if "lists" in only:
            list_plain, list_masked = statistics.median(lists["plain"]), statistics.median(lists["masked"])
            ratio = list_masked / list_plain
            met = "yes" if ratio <= 2 else "**no**"
            print(
                f"| GET 5,000 Secrets (s) | {list_plain:.3f} | {list_masked:.3f} | {ratio:.2f}x | ≤ 2x | {met} |"
            )
            pods_plain, pods_masked = (
                statistics.median(pod_lists["plain"]),
                statistics.median(pod_lists["masked"]),
            )
            ratio = pods_masked / pods_plain
            met = "yes" if ratio <= 2 else "**no**"
            print(
                f"| GET 500 Pods (s) | {pods_plain:.3f} | {pods_masked:.3f} | {ratio:.2f}x | ≤ 2x | {met} |"
            )
        if "pod" in only:
            rate_plain, rate_masked = (
                statistics.median(pod_rates["plain"]),
                statistics.median(pod_rates["masked"]),
            )
            print(
                f"| GET one Pod, c=32 (requests/s) | {rate_plain:.0f} | {rate_masked:.0f} | "
                f"{rate_masked / rate_plain:.2f}x | measured | — |"
            )
        for kind, label in kinds.items() if "logs" in only else ():
            plain_rate = statistics.median(logs[kind]["plain"])
            masked_rate = statistics.median(logs[kind]["masked"])
            met = "yes" if masked_rate >= 50 else "**no**"
            print(
                f"| pods/log 64 MiB, {label} (MB/s) | {plain_rate:.0f} | {masked_rate:.0f} | "
                f"{masked_rate / plain_rate:.2f}x | masked ≥ 50 MB/s | {met} |"
            )
        if keys:
            key_plain = statistics.median(keys["plain"])
            for name, label in (("masked", "exec_hold_from 1, the default"), ("echo", "exec_hold_from 4")):
                key_masked = statistics.median(keys[name])
                print(
                    f"| exec keystroke round trip, median of {len(keys['plain'])} (ms), {label} | "
                    f"{key_plain:.2f} | {key_masked:.2f} | +{key_masked - key_plain:.2f} ms | "
                    "measured (held up to exec_hold_ms) | — |"
                )
        pod_round = f"pod req/s plain {[round(x) for x in pod_rates['plain']]} masked " + str(
            [round(x) for x in pod_rates["masked"]]
        )
        pod_list_round = f"pod list s plain {[round(x, 3) for x in pod_lists['plain']]} masked " + str(
            [round(x, 3) for x in pod_lists["masked"]]
        )
        per_round = "; ".join(
            f"log {k} MB/s plain {[round(x) for x in v['plain']]} masked {[round(x) for x in v['masked']]}"
            for k, v in logs.items()
        )
        print(
            f"\nrounds: {args.rounds}; list s plain {[round(x, 3) for x in lists['plain']]} "
            f"masked {[round(x, 3) for x in lists['masked']]}; {pod_list_round}; {pod_round}; {per_round}"
        )
    finally:
        PROCS.stop_all()


if __name__ == "__main__":
    main()
