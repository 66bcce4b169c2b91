"""The `static-tokens` plugin's command, through `kubegate_cli_commands`: `kubegate static-token` makes a
token and the config entry that accepts it (only the token's SHA-256 goes into the config). Light imports
only: every `kubegate` run builds the whole parser."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets

from kubegate.core.cli import add_output_argument, hookimpl


def cmd_static_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    if args.output == "json":
        print(
            json.dumps({"token": token, "entry": {"user": args.user, "groups": args.group, "sha256": digest}})
        )
        return 0
    groups = "".join(f"\n      - {g}" for g in args.group) or " []"
    print(f"token: {token}")
    print("# add under connections.NAME.plugins.static-tokens.tokens:")
    print(f"  - user: {args.user}\n    groups:{groups}\n    sha256: {digest}")
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = subparsers.add_parser("static-token", help="make a token and its static-tokens config entry")
    token.add_argument("--user", required=True, help="the user name the token authenticates as")
    token.add_argument("--group", action="append", default=[], help="a group of that user (repeat)")
    add_output_argument(token)
    token.set_defaults(func=cmd_static_token)
