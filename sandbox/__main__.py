"""`python -m kubegate.sandbox serve --dir DIR [--host H] [--port P]`: run a sandbox cluster.

Prints one JSON line (url, port, kubeconfig, token, ca_file, client_cert, client_key) on stdout once the
server accepts connections, logs to stderr, and stops pod processes cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from .server import start_sandbox


async def serve(directory: Path, host: str, port: int) -> None:
    handle = await start_sandbox(directory, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps(handle.info()) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await handle.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubegate.sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a sandbox cluster")
    s.add_argument("--dir", required=True, type=Path, help="state directory (TLS, token, kubeconfig, pods)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", default=0, type=int, help="0 picks a free port")
    s.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args.dir, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
