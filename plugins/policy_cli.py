"""The `policy` plugin's command, through `kubegate_cli_commands`: `kubegate policy check` — which rule
decides a request, and why, without calling a cluster. Light imports only (every `kubegate` run builds the
whole parser); the handler loads the gateway's config and `policy_check` when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubegate.core.cli import CLIError, add_config_argument, add_output_argument, hookimpl

if TYPE_CHECKING:
    from kubegate.core.connections import Connection
    from kubegate.core.flow import Identity


def cmd_policy_check(args: argparse.Namespace) -> int:
    from kubegate.core.gateway import Gateway
    from kubegate.plugins.policy import PLUGIN_NAME, PolicySettings
    from kubegate.plugins.policy_check import CheckError, check

    gateway = Gateway.from_config(Path(args.config))
    connection = gateway.connections.get(args.connection)
    if connection is None:
        raise CLIError(
            f"no connection {args.connection!r} in {args.config} (have: {', '.join(gateway.connections.names)})"
        )
    settings = connection.settings_for(PLUGIN_NAME)
    if not isinstance(settings, PolicySettings):
        raise CLIError(f"connection {args.connection} does not enable the policy plugin")
    claims = {}
    for pair in args.claim:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CLIError(f"--claim takes NAME=VALUE, got {pair!r}")
        claims[key] = value
    groups = tuple(g for item in args.group for g in item.split(",") if g)
    identity, source = identity_of(connection, args.as_user, groups, args.method, claims)
    body = None
    if args.body:
        try:
            body = Path(args.body).read_bytes()
        except OSError as exc:
            raise CLIError(f"cannot read {args.body}: {exc.strerror}") from None
    try:
        request = list(args.request)
        argv = request[1:] if request[:1] == ["--"] else request
        result = check(settings, identity, argv, body, args.content_type)
    except CheckError as exc:
        raise CLIError(str(exc)) from None
    text: list[str] = result.pop("text")
    if args.output == "json":
        who = {"user": identity.user, "groups": list(identity.groups), "method": identity.method}
        print(json.dumps({"identity": who | {"source": source}} | result, indent=2))
    else:
        at = next((i + 1 for i, line in enumerate(text) if line.startswith("as:")), 1)
        print("\n".join([*text[:at], f"          ({source})", *text[at:]]))
    return 0


def identity_of(connection: Connection, user: str, groups: tuple[str, ...], method: str,
                claims: dict[str, Any]) -> tuple[Identity, str]:  # fmt: skip
    """The caller as the live gateway would see them, and where that came from. A user with a static token
    on the connection is who that token makes them (its groups, uid and method), as static-tokens
    authenticates them; `--group`/`--method` given say otherwise and win. Anyone else is what the flags say."""
    from kubegate.core.flow import Identity

    entries = static_token_entries(connection, user)
    if entries and not groups and not method:
        distinct = {(tuple(e.groups), e.uid) for e in entries}
        if len(distinct) > 1:  # two tokens of one name, different groups: which one is asked about?
            choices = "; ".join(", ".join(g) or "no groups" for g, _ in sorted(distinct))
            raise CLIError(f"{user} has {len(distinct)} static tokens with different groups ({choices}): "
                           "say which with --group")  # fmt: skip
        ((token_groups, uid),) = distinct
        source = f"groups and method from {user}'s static token on connection {connection.name}"
        return Identity(user=user, groups=token_groups, uid=uid, method=STATIC_TOKENS, claims=claims), source
    if entries:
        source = f"from --group/--method, not from {user}'s static token on connection {connection.name}"
    elif STATIC_TOKENS in connection.enabled_plugins:
        source = f"from --as/--group/--method: {user} has no static token on connection {connection.name}"
    else:
        source = "from --as/--group/--method"
    return Identity(user=user, groups=groups, method=method, claims=claims), source


STATIC_TOKENS = "static-tokens"  # the plugin's name (its settings are read, its module is not imported)


def static_token_entries(connection: Connection, user: str) -> list[Any]:
    """The connection's static-tokens entries (`user`, `groups`, `uid`) of `user`, when it enables the plugin."""
    if STATIC_TOKENS not in connection.enabled_plugins:
        return []
    settings = connection.settings_for(STATIC_TOKENS)
    return [t for t in getattr(settings, "tokens", None) or [] if getattr(t, "user", None) == user]


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="check", required=True)
    pcheck = policy_sub.add_parser(
        "check",
        help="which policy rule decides a request, and why (no cluster is called)",
        description="Examples: kubegate policy check --connection prod --as alice --group developers -- "
        "kubectl delete pod web -n prod;  ... --as ci-bot -- DELETE /api/v1/namespaces/prod/pods/web (ci-bot's "
        "groups from its static token)",
    )
    add_config_argument(pcheck)
    pcheck.add_argument("--connection", required=True, help="the connection whose policy decides")
    pcheck.add_argument("--as", dest="as_user", required=True, metavar="USER",
                        help="the caller's user name; a user with a static token on the connection gets its "
                        "groups and method, as the gateway would")  # fmt: skip
    pcheck.add_argument("--group", "--groups", action="append", default=[],
                        help="a group (repeat, or a,b); given, it replaces a static token's groups")  # fmt: skip
    pcheck.add_argument("--method", default="", help="authentication method, e.g. oidc or login:oidc")
    pcheck.add_argument("--claim", action="append", default=[], help="NAME=VALUE of a kept claim (repeat)")
    pcheck.add_argument("--body", help="file with the request body (for conditions on `object`)")
    pcheck.add_argument("--content-type", default="",
                        help="the body's Content-Type (default: guessed as kubectl would send it); "
                        "application/apply-patch+yaml for a server-side apply")  # fmt: skip
    add_output_argument(pcheck)
    pcheck.add_argument("request", nargs=argparse.REMAINDER, help="-- kubectl ... | -- METHOD /path")
    pcheck.set_defaults(func=cmd_policy_check)
