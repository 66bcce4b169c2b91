"""The sandbox's command, through `kubegate_cli_commands`: `kubegate demo` runs a sandbox cluster behind
the gateway (`demo.py`). Light imports only: every `kubegate` run builds the whole parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from kubegate.core.cli import CLIError, hookimpl


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoPortError, run_demo

    try:
        return run_demo(
            Path(args.dir), port=args.port, sandbox_port=args.sandbox_port, idp_port=args.idp_port
        )
    except DemoPortError as exc:
        raise CLIError(str(exc)) from None


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run a sandbox cluster behind the gateway with demo users",
        description="Everything listens on 127.0.0.1. `make demo PORT=8444 SANDBOX_PORT=… IDP_PORT=…` passes "
        "the ports through. A port in use stops the demo with one line naming its flag.",
    )
    demo.add_argument("--dir", default=".kubegate/demo", help="where the demo writes its files")
    demo.add_argument("--port", type=int, default=8443, help="the gateway's port (default 8443)")
    demo.add_argument("--sandbox-port", type=int, default=0,
                      help="the sandbox cluster's port (default 0: any free port; only the gateway calls it)")  # fmt: skip
    demo.add_argument("--idp-port", type=int, default=0,
                      help="the demo identity provider's port, part of its issuer URL (default 0: any free port)")  # fmt: skip
    demo.set_defaults(func=cmd_demo)
