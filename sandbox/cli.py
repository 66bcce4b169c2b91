"""The sandbox's command, through `kubegate_cli_commands`: `kubegate demo` runs a sandbox cluster behind
the gateway (`demo.py`). Light imports only: every `kubegate` run builds the whole parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from kubegate.core.cli import hookimpl


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir), port=args.port)


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="run a sandbox cluster behind the gateway with demo users")
    demo.add_argument("--dir", default=".kubegate/demo", help="where the demo writes its files")
    demo.add_argument("--port", type=int, default=8443, help="gateway port (default 8443)")
    demo.set_defaults(func=cmd_demo)
