"""`kubegate login|credential|logout` (the user's side of the browser login) and `kubegate tokens` (the
admin's list of gateway-issued tokens), contributed through `kubegate_cli_commands`.

kubectl runs `kubegate credential` before every request: this module imports only light modules; each
handler imports the client or the store when it runs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kubegate.core.cli import (
    CLIError,
    add_config_argument,
    add_output_argument,
    database_from_config,
    hookimpl,
)

if TYPE_CHECKING:
    from .client import Target


def add_target_arguments(p: argparse.ArgumentParser, *, remembered: bool = False) -> None:
    """The flags that name a gateway and a connection (login, credential, logout, approvals). `remembered`:
    each may be left out, and `target_of` takes it from the last `kubegate login`."""
    default = " (default: the last kubegate login's)" if remembered else ""
    p.add_argument("--gateway", required=not remembered,
                   help=f"the gateway's URL, e.g. https://kubegate.example.com{default}")  # fmt: skip
    p.add_argument("--connection", required=not remembered, help=f"the connection (cluster) to use{default}")
    p.add_argument("--certificate-authority", help=f"CA file to trust for the gateway's certificate{default}")
    p.add_argument("--insecure-skip-tls-verify", action="store_true", help=argparse.SUPPRESS)


def add_browser_argument(p: argparse.ArgumentParser) -> None:
    """Only where a browser may open: `login`, and `credential` (which logs in when no token is cached)."""
    p.add_argument("--no-browser", action="store_true", help="only print the URL to open (headless use)")


def target_of(args: argparse.Namespace) -> Target:
    """The gateway and connection the flags of `add_target_arguments` name; a bad value is a CLIError.
    A flag left out (where `remembered`) comes from the last `kubegate login`; a flag given wins, and the
    remembered CA is used only with the remembered gateway (it vouches for that gateway alone)."""
    from .client import Target, remembered_target

    gateway, connection, ca_file = args.gateway, args.connection, args.certificate_authority
    if not (gateway and connection):
        last = remembered_target()
        if last is None:
            raise CLIError("no gateway given and none remembered: run kubegate login --gateway URL "
                           "--connection NAME first, or give --gateway and --connection")  # fmt: skip
        gateway = gateway or last.gateway
        connection = connection or last.connection
        if ca_file is None and gateway.rstrip("/") == last.gateway.rstrip("/"):
            ca_file = last.ca_file
    gateway = gateway.rstrip("/")
    if not gateway.startswith(("https://", "http://")):
        raise CLIError(f"--gateway must be a URL such as https://kubegate.example.com, got {gateway!r}")
    if ca_file and not Path(ca_file).is_file():
        raise CLIError(f"no such file: {ca_file}")
    return Target(gateway, connection, ca_file, args.insecure_skip_tls_verify)


def _self_command() -> str:
    """How kubectl should run this program again (an absolute path when we know it)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "kubegate" and argv0.is_file():
        return str(argv0.resolve())
    return shutil.which("kubegate") or "kubegate"


def cmd_login(args: argparse.Namespace) -> int:
    from .client import ClientError, default_kubeconfig, login, remember_target, update_kubeconfig

    target = target_of(args)
    try:
        answer = login(target, open_browser=not args.no_browser)
        path = Path(args.kubeconfig) if args.kubeconfig else default_kubeconfig()
        context = update_kubeconfig(path, target, _self_command(), set_current=not args.no_set_context)
        remember_target(target)  # for `kubegate approvals` without flags
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    until = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(float(answer["expires_at"])))
    groups = ", ".join(answer.get("groups") or []) or "none"
    print(f"Logged in as {answer['user']} (groups: {groups}) until {until}.", file=sys.stderr)
    print(
        f"kubeconfig {path}: context {context} runs `kubegate credential`; try: kubectl --context {context} auth whoami",
        file=sys.stderr,
    )
    return 0


def cmd_credential(args: argparse.Namespace) -> int:
    from .client import ClientError, credential

    target = target_of(args)
    try:
        answer = credential(target, open_browser=not args.no_browser)
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(answer))
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from .client import ClientError, logout

    try:
        revoked = logout(target_of(args))
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    print(
        f"revoked token {revoked}" if revoked else "no cached token for this gateway and connection",
        file=sys.stderr,
    )
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from kubegate.core.db import DatabaseError

    from . import store

    database = database_from_config(args.config)
    try:
        if args.tokens_command == "list":
            records = database.call(lambda s: store.list_tokens(s, user=args.user, include_inactive=args.all))
            if args.output == "json":
                print(json.dumps([r.model_dump() | {"token_hash": None} for r in records], indent=2))
                return 0
            now = time.time()
            print(
                f"{'ID':<13} {'USER':<32} {'METHOD':<9} {'PROVIDER':<12} {'CONNECTION':<11} {'EXPIRES':<17} STATE"
            )
            for r in records:
                expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.expires_at))
                print(
                    f"{r.id:<13} {r.user:<32} {r.method:<9} {r.provider:<12} {r.connection or '*':<11} {expires:<17} {r.state(now)}"
                )
            return 0
        if not args.id and not args.user:
            raise CLIError("say which tokens to revoke: a token ID, or --user NAME for all of theirs")
        if args.id and args.user:
            raise CLIError("give a token ID or --user, not both")
        by = f"admin ({getpass.getuser()})"
        revoked = database.call(lambda s: store.revoke_tokens(s, token_id=args.id, user=args.user, by=by))
    except DatabaseError as exc:
        raise CLIError(str(exc)) from None
    if not revoked:
        raise CLIError(f"no active token {args.id}" if args.id else f"{args.user} has no active tokens")
    for r in revoked:
        print(f"revoked {r.id} ({r.user})")
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = subparsers.add_parser(
        "login", help="log in through the browser and set up kubectl for a connection"
    )
    add_target_arguments(login)
    add_browser_argument(login)
    login.add_argument("--kubeconfig", help="kubeconfig to update (default: $KUBECONFIG or ~/.kube/config)")
    login.add_argument("--no-set-context", action="store_true", help="don't make it the current context")
    login.set_defaults(func=cmd_login)

    cred = subparsers.add_parser(
        "credential", help="kubectl exec credential plugin (set up by kubegate login)"
    )
    add_target_arguments(cred)
    add_browser_argument(cred)
    cred.set_defaults(func=cmd_credential)

    logout = subparsers.add_parser("logout", help="revoke and forget the cached token of a connection")
    add_target_arguments(logout)
    logout.set_defaults(func=cmd_logout)

    tokens = subparsers.add_parser(
        "tokens", help="list or revoke gateway-issued tokens (reads the gateway's database)"
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="list|revoke", required=True)
    tokens_list = tokens_sub.add_parser("list", help="active tokens (all with --all)")
    add_config_argument(tokens_list)
    tokens_list.add_argument("--user", help="only this user's")
    tokens_list.add_argument("--all", action="store_true", help="include expired and revoked tokens")
    add_output_argument(tokens_list)
    tokens_list.set_defaults(func=cmd_tokens)
    tokens_revoke = tokens_sub.add_parser("revoke", help="revoke a token by ID, or all of a user's")
    add_config_argument(tokens_revoke)
    tokens_revoke.add_argument("id", nargs="?", help="token ID (from tokens list)")
    tokens_revoke.add_argument("--user", help="revoke every active token of this user")
    tokens_revoke.set_defaults(func=cmd_tokens)
