"""The ``kubegate`` command.

Every failure a user can cause prints one line (``kubegate: error: ...``) and exits non-zero; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import secrets
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .config import ConfigError

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing failure: printed as one line."""


def _version() -> str:
    try:
        return version("kubegate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def _load(config: str):
    from .gateway import Gateway

    return Gateway.from_config(Path(config))


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run

    gateway = _load(args.config)
    logging.basicConfig(
        level=getattr(logging, gateway.settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run(gateway, bind=args.bind, announce=lambda line: print(line, file=sys.stderr, flush=True))
    except OSError as exc:
        raise CLIError(
            f"cannot serve on {args.bind or gateway.settings.listen}: {exc.strerror or exc}"
        ) from None
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from .kubeconfig import dump, gateway_kubeconfig
    from .server import tls_files

    gateway = _load(args.config)
    if gateway.connections.get(args.connection) is None:
        raise CLIError(
            f"no connection {args.connection!r} in {args.config} (have: {', '.join(gateway.connections.names)})"
        )
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read {args.token_file}: {exc.strerror}") from None
    else:
        token = args.token
    if not token:
        raise CLIError("give the user's gateway token with --token or --token-file")
    ca_pem = None
    if args.ca_file:
        ca_pem = Path(args.ca_file).read_bytes()
    else:
        tls = tls_files(gateway)
        if tls and tls.ca:
            ca_pem = tls.ca.read_bytes()
    config = gateway_kubeconfig(
        cluster=args.connection,
        server=gateway.connection_url(args.connection),
        ca_pem=ca_pem,
        users=[(args.user, token)],
    )
    print(dump(config), end="")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import PluginHost

    if args.config:
        gateway = _load(args.config)
        host = gateway.plugins
        enabled: dict[str, list[str]] = {}
        for connection in gateway.connections:
            for name in connection.enabled_plugins:
                enabled.setdefault(name, []).append(connection.name)
    else:
        host, enabled = PluginHost(), {}
    for info in host.describe():
        where = ", ".join(enabled.get(info.name, [])) or ("-" if args.config else "")
        print(f"{info.name:<16} {info.origin:<10} {info.module}")
        print(f"{'':<16} hooks: {', '.join(h.removeprefix('kubegate_') for h in info.hooks)}")
        if args.config:
            print(f"{'':<16} enabled on: {where}")
    return 0


def cmd_static_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    groups = "".join(f"\n      - {g}" for g in args.group) or " []"
    print(f"token: {token}")
    print("# add under connections.NAME.plugins.static-tokens.tokens:")
    print(f"  - user: {args.user}\n    groups:{groups}\n    sha256: {digest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir), port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubegate", description="An access gateway for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubegate {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", default="kubegate.yaml", help="config file (default: kubegate.yaml)")
    serve.add_argument("--bind", help="HOST:PORT, overriding `listen` in the config")
    serve.set_defaults(func=cmd_serve)

    kubeconfig = sub.add_parser(
        "kubeconfig", help="print a kubeconfig that reaches a connection through the gateway"
    )
    kubeconfig.add_argument("--config", "-c", default="kubegate.yaml")
    kubeconfig.add_argument("--connection", required=True)
    kubeconfig.add_argument("--user", default="me", help="name of the kubeconfig user entry")
    kubeconfig.add_argument("--token", help="the user's gateway token")
    kubeconfig.add_argument("--token-file", help="file holding the user's gateway token")
    kubeconfig.add_argument("--ca-file", help="CA to trust (default: the gateway's generated CA, if any)")
    kubeconfig.set_defaults(func=cmd_kubeconfig)

    plugins = sub.add_parser("plugins", help="list installed plugins and where each is enabled")
    plugins.add_argument("--config", "-c", help="also show which connections enable each plugin")
    plugins.set_defaults(func=cmd_plugins)

    token = sub.add_parser("static-token", help="make a token and its static-tokens config entry")
    token.add_argument("--user", required=True)
    token.add_argument("--group", action="append", default=[])
    token.set_defaults(func=cmd_static_token)

    demo = sub.add_parser("demo", help="run a sandbox cluster behind the gateway with demo users")
    demo.add_argument("--dir", default=".kubegate/demo", help="where the demo writes its files")
    demo.add_argument("--port", type=int, default=8443, help="gateway port (default 8443)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (ConfigError, CLIError) as exc:
        print(f"kubegate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
