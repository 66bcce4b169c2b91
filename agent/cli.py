"""`kubegate agent` (run the agent) and `kubegate agent keygen` (make its identity ahead of time)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kubegate.core.cli import hookimpl


def add_commands(sub: argparse._SubParsersAction) -> None:
    agent = sub.add_parser(
        "agent", help="run next to a cluster: dial out to the gateway and serve its agent connections"
    )
    agent.add_argument("--config", "-c", default="agent.yaml", help="agent.yaml (default: ./agent.yaml)")
    agent.add_argument(
        "--join-token",
        help="a token from `kubegate agents join-token`, needed at the first start only "
        "(or KUBEGATE_JOIN_TOKEN, or join_token_file in agent.yaml)",
    )
    agent.set_defaults(func=cmd_agent)
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="keygen")
    keygen = agent_sub.add_parser("keygen", help="write a new agent identity (Ed25519 private key)")
    keygen.add_argument("--identity-file", required=True, type=Path, help="where to write the private key")
    keygen.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from kubegate.core.cli import CLIError

    from .run import AgentError, generate_identity

    try:
        key = generate_identity(args.identity_file)
    except AgentError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {args.identity_file} ({key.get_fingerprint('sha256')})")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from kubegate.core.cli import CLIError
    from kubegate.core.server import asyncio_run

    from .config import load_agent_settings
    from .run import Agent, AgentError

    path = Path(args.config)
    settings = load_agent_settings(path)
    _setup_logging(settings.log_level, settings.log_format)
    agent = Agent(settings, path, join_token=args.join_token or os.environ.get("KUBEGATE_JOIN_TOKEN") or None)
    failure: list[str] = []

    async def main() -> None:
        try:
            await agent.run()
        except AgentError as exc:
            failure.append(str(exc))

    try:
        asyncio_run(main())
    except KeyboardInterrupt:
        return 130
    if failure:
        raise CLIError(failure[0])
    return 0


def _setup_logging(level: str, fmt: str) -> None:
    import logging

    from kubegate.core.observe import setup_logging

    setup_logging(level, fmt)
    # One line per request is on the request path: skip what no agent log line shows (the logging HOWTO's
    # "Optimization": no caller lookup per record, no thread/process names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_commands(subparsers)
