"""Masking cost, side by side in one run: the same gateway config with and without the `masking` plugin,
in front of the bench upstream (bench/upstream.py), which serves a 5,000-Secret list and a 64 MiB log.

    .venv/bin/python bench/masking.py [--rounds 5]

Measured (medians over the rounds, plain and masked alternating):
  - GET of the 5,000-Secret list (about 2.6 MB of JSON): seconds, masked / plain (target ≤ 2x);
  - GET of a 500-Pod list (1.2 MB of JSON, nothing in it masked: the cost of inspecting and re-serializing);
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
        for _ in range(args.rounds):
            for name, target in (("plain", plain), ("masked", masked)):
                seconds, _, head = asyncio.run(
                    fetch(target.url("/api/v1/namespaces/prod/secrets"), target.token)
                )
                if name == "masked":
                    assert MARKER_B64.encode() in head, "the masked list is not masked"
                lists[name].append(seconds)
                seconds, _, _ = asyncio.run(fetch(target.url("/api/v1/namespaces/prod/pods"), target.token))
                pod_lists[name].append(seconds)
                for kind in kinds:
                    url = target.url(f"/api/v1/namespaces/prod/pods/web/log?kind={kind}")
                    seconds, size, head = asyncio.run(fetch(url, target.token))
                    if name == "masked":
                        assert b"s3cret-value" not in head, "the masked log is not masked"
                    logs[kind][name].append(size / seconds / 1e6)
        keys = {
            name: asyncio.run(keystrokes(target))
            for name, target in (("plain", plain), ("masked", masked), ("echo", echo))
        }
        list_plain, list_masked = statistics.median(lists["plain"]), statistics.median(lists["masked"])
        print("| measure | plain | masked | masked / plain | target | met |")
        print("| --- | ---: | ---: | ---: | --- | --- |")
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
        print(f"| GET 500 Pods (s) | {pods_plain:.3f} | {pods_masked:.3f} | {ratio:.2f}x | ≤ 2x | {met} |")
        for kind, label in kinds.items():
            plain_rate = statistics.median(logs[kind]["plain"])
            masked_rate = statistics.median(logs[kind]["masked"])
            met = "yes" if masked_rate >= 50 else "**no**"
            print(
                f"| pods/log 64 MiB, {label} (MB/s) | {plain_rate:.0f} | {masked_rate:.0f} | "
                f"{masked_rate / plain_rate:.2f}x | masked ≥ 50 MB/s | {met} |"
            )
        key_plain = statistics.median(keys["plain"])
        for name, label in (("masked", "exec_hold_from 1, the default"), ("echo", "exec_hold_from 4")):
            key_masked = statistics.median(keys[name])
            print(
                f"| exec keystroke round trip, median of {len(keys['plain'])} (ms), {label} | {key_plain:.2f} | "
                f"{key_masked:.2f} | +{key_masked - key_plain:.2f} ms | measured (held up to exec_hold_ms) | — |"
            )
        per_round = "; ".join(
            f"log {k} MB/s plain {[round(x) for x in v['plain']]} masked {[round(x) for x in v['masked']]}"
            for k, v in logs.items()
        )
        print(
            f"\nrounds: {args.rounds}; list s plain {[round(x, 3) for x in lists['plain']]} "
            f"masked {[round(x, 3) for x in lists['masked']]}; {per_round}"
        )
    finally:
        PROCS.stop_all()


if __name__ == "__main__":
    main()
