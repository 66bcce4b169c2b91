"""What one more Python process on the request path costs by itself: the small GET at concurrency 1 through
the gateway, through the gateway with a plain uvloop byte relay between it and the upstream (no TLS of its
own, no parsing), and through the agent tunnel — side by side, in rounds.

This is how the agent tunnel's cost was split (docs/performance.md, "Through the agent tunnel", 4.): if the
relay adds next to nothing, what the agent adds beyond it is the tunnel's own work, not the extra hop.

    .venv/bin/python bench/relay_floor.py [--rounds 3] [--duration 4]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # bench/run.py: the same processes and wrk cells as the benchmark


class _Pipe(asyncio.Protocol):
    def __init__(self, peer: _Pipe | None = None):
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Downstream(_Pipe):
    target = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        self.dialing = asyncio.ensure_future(self._dial())

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: _Pipe(self), "127.0.0.1", self.target)
        self.peer = upstream
        assert self.transport is not None
        self.transport.resume_reading()


def serve_relay(listen: int, target: int) -> None:
    """The relay process: bytes both ways, one upstream connection per client connection."""
    import uvloop

    _Downstream.target = target

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Downstream, "127.0.0.1", listen)
        await server.serve_forever()

    uvloop.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="seconds per cell")
    parser.add_argument("--relay", nargs=2, type=int, metavar=("LISTEN", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        serve_relay(*args.relay)
        return 0
    work = Path(tempfile.mkdtemp(prefix="kubegate-relay-floor-"))
    try:
        up = bench.start_upstream(work)
        gateway = bench.start_gateway(work, up, label="gateway")
        relay_port = bench.free_port()
        bench.PROCS.start("relay", [sys.executable, __file__, "--relay", str(relay_port), str(up.port)],
                          work / "relay.log")  # fmt: skip
        time.sleep(1)
        relayed_up = dataclasses.replace(up, url=up.url.replace(f":{up.port}", f":{relay_port}"))
        relayed = bench.start_gateway(work, relayed_up, label="gateway-relay")
        relayed.name = "relay"
        agent = bench.start_gateway(work, up, label="agent", agent=True)
        size = len(bench.http_get(gateway.url(bench.POD_PATH), gateway.token)[1])
        cells: dict[str, list[bench.Cell]] = {}
        for _ in range(args.rounds):
            for target in (gateway, relayed, agent):
                cell = bench.measure_requests(target, "small", bench.POD_PATH, 1, args.duration, size)
                cells.setdefault(target.name, []).append(cell)
        print(
            f"\nsmall GET, c=1, {args.rounds} rounds of {args.duration:g} s; vs the gateway in the same round:"
        )
        for name in ("relay", "agent"):
            ratios = [c.rps / g.rps for c, g in zip(cells[name], cells["gateway"], strict=True)]
            added = [c.p50_ms - g.p50_ms for c, g in zip(cells[name], cells["gateway"], strict=True)]
            print(f"  {name:<6} req/s ratio {statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}); "
                  f"p50 added {statistics.median(added):+.2f} ms ({', '.join(f'{a:+.2f}' for a in added)})")  # fmt: skip
    finally:
        bench.PROCS.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
