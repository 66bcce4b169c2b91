"""The `approvals` plugin's commands, through `kubegate_cli_commands`: `kubegate approvals` (a reviewer's side,
with their login token) and `kubegate grants` (the admin's list of time-window grants, read from the
database).

Beside the package, not in it: importing `kubegate.plugins.approvals` loads the plugin (the database layer,
the plugin host), and every `kubegate` run — `kubegate credential`, before each kubectl request — builds the
whole parser. Each handler imports the client or the store when it runs."""

from __future__ import annotations

import argparse
import getpass
import json
import time
from pathlib import Path

from kubegate.core.cli import (
    CLIError,
    add_config_argument,
    add_output_argument,
    database_from_config,
    hookimpl,
)

# The reviewer's client reaches the gateway as `kubegate login` set it up: the login plugin's target flags,
# token cache and HTTP client (an allowed edge of the import-linter contracts, pyproject.toml).
from kubegate.plugins.login.cli import add_target_arguments, target_of


def cmd_approvals(args: argparse.Namespace) -> int:
    from kubegate.plugins.approvals.client import describe, request, table, token_for
    from kubegate.plugins.login.client import ClientError

    target = target_of(args)
    given = args.token
    if args.token_file:
        try:
            given = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read {args.token_file}: {exc.strerror}") from None
    try:
        token = token_for(target, given)
        if args.approvals_command == "list":
            answer = request(target, token, "GET", f"/api/approvals?state={args.state}")
            items = answer["items"]
            print(json.dumps(items, indent=2) if args.output == "json" else "\n".join(table(items)))
        elif args.approvals_command == "show":
            item = request(target, token, "GET", f"/api/approvals/{args.id}")
            print(json.dumps(item, indent=2) if args.output == "json" else "\n".join(describe(item)))
        else:
            action = args.approvals_command
            item = request(
                target, token, "POST", f"/api/approvals/{args.id}/{action}", {"comment": args.comment}
            )
            print(f"{args.id}: {item['state']} ({len(item['approvals'])} of {item['min_approvals']} approvals)"
                  if action == "approve" else f"{args.id}: denied")  # fmt: skip
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    from kubegate.core.db import DatabaseError
    from kubegate.plugins.approvals import store

    database = database_from_config(args.config)
    try:
        if args.grants_command == "list":
            grants = database.call(lambda s: store.list_grants(s, include_inactive=args.all))
            now = time.time()
            if args.output == "json":
                print(json.dumps([g.model_dump() | {"state": g.state(now)} for g in grants], indent=2))
                return 0
            print(f"{'ID':<11} {'USER':<28} {'CONNECTION':<12} {'RULE':<24} {'EXPIRES':<17} STATE")
            for g in grants:
                expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(g.expires_at))
                print(
                    f"{g.id:<11} {g.user[:28]:<28} {g.connection:<12} {g.rule[:24]:<24} {expires:<17} {g.state(now)}"
                )
            return 0
        by = f"admin ({getpass.getuser()})"
        grant = database.call(lambda s: store.revoke_grant(s, args.id, by))
    except DatabaseError as exc:
        raise CLIError(str(exc)) from None
    if grant is None:
        raise CLIError(f"no active grant {args.id}")
    print(f"revoked grant {grant.id} ({grant.user}, rule {grant.rule})")
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    approvals = subparsers.add_parser(
        "approvals", help="review held requests (with your kubegate login token)"
    )
    approvals_sub = approvals.add_subparsers(
        dest="approvals_command", metavar="list|show|approve|deny", required=True
    )
    for name, text in [
        ("list", "requests you may review or made"),
        ("show", "one request in full"),
        ("approve", "approve a request"),
        ("deny", "deny a request"),
    ]:
        p = approvals_sub.add_parser(name, help=text)
        add_target_arguments(p, remembered=True)
        p.add_argument("--token", help="a gateway token (default: the one kubegate login cached)")
        p.add_argument("--token-file", help="file holding the token")
        if name == "list":
            p.add_argument(
                "--state", default="pending", help="pending (default), approved, denied, expired, used, all"
            )
        else:
            p.add_argument("id", help="approval request ID")
        if name in ("approve", "deny"):
            p.add_argument(
                "--comment", "-m", default="", help="shown to the requester (kubectl prints a denial's)"
            )
        if name in ("list", "show"):
            add_output_argument(p)
        p.set_defaults(func=cmd_approvals)

    grants = subparsers.add_parser(
        "grants", help="list or revoke time-window grants (reads the gateway's database)"
    )
    grants_sub = grants.add_subparsers(dest="grants_command", metavar="list|revoke", required=True)
    grants_list = grants_sub.add_parser("list", help="active grants (all with --all)")
    add_config_argument(grants_list)
    grants_list.add_argument("--all", action="store_true", help="include expired and revoked grants")
    add_output_argument(grants_list)
    grants_list.set_defaults(func=cmd_grants)
    grants_revoke = grants_sub.add_parser("revoke", help="end a grant now")
    add_config_argument(grants_revoke)
    grants_revoke.add_argument("id", help="grant ID (from grants list)")
    grants_revoke.set_defaults(func=cmd_grants)
