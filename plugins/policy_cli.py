"""The `policy` plugin's command, through `kubegate_cli_commands`: `kubegate policy check` — which rule
decides a request, and why, without calling a cluster. Light imports only (every `kubegate` run builds the
whole parser); the handler loads the gateway's config and `policy_check` when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kubegate.core.cli import CLIError, hookimpl


def cmd_policy_check(args: argparse.Namespace) -> int:
    from kubegate.core.flow import Identity
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
    identity = Identity(user=args.as_user, groups=groups, method=args.method, claims=claims)
    body = None
    if args.body:
        try:
            body = Path(args.body).read_bytes()
        except OSError as exc:
            raise CLIError(f"cannot read {args.body}: {exc.strerror}") from None
    try:
        request = list(args.request)
        result = check(settings, identity, request[1:] if request[:1] == ["--"] else request, body)
    except CheckError as exc:
        raise CLIError(str(exc)) from None
    if args.output == "json":
        result.pop("text")
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(result["text"]))
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="check", required=True)
    pcheck = policy_sub.add_parser(
        "check",
        help="which policy rule decides a request, and why (no cluster is called)",
        description="Examples: kubegate policy check --connection prod --as alice --group developers -- "
        "kubectl delete pod web -n prod;  ... -- DELETE /api/v1/namespaces/prod/pods/web",
    )
    pcheck.add_argument("--config", "-c", default="kubegate.yaml")
    pcheck.add_argument("--connection", required=True)
    pcheck.add_argument("--as", dest="as_user", required=True, metavar="USER", help="the caller's user name")
    pcheck.add_argument("--group", "--groups", action="append", default=[], help="a group (repeat, or a,b)")
    pcheck.add_argument("--method", default="", help="authentication method, e.g. oidc or login:oidc")
    pcheck.add_argument("--claim", action="append", default=[], help="NAME=VALUE of a kept claim (repeat)")
    pcheck.add_argument("--body", help="file with the request body (for conditions on `object`)")
    pcheck.add_argument("--output", "-o", choices=["text", "json"], default="text")
    pcheck.add_argument("request", nargs=argparse.REMAINDER, help="-- kubectl ... | -- METHOD /path")
    pcheck.set_defaults(func=cmd_policy_check)
