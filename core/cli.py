"""The ``kubegate`` command.

Every failure a user can cause prints one line (``kubegate: error: ...``) and exits non-zero; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from .errors import ConfigError

if TYPE_CHECKING:
    from .db import Database
    from .gateway import Gateway

EXIT_USAGE = 2
# The same marker as `kubegate.core.plugins.hookimpl`, importable without the plugin host: a command module
# implements `kubegate_cli_commands` with it (and uses `CLIError`, `database_from_config` from here).
hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
# Built-in modules that contribute commands, in `kubegate --help` order; like `DEFAULT_PLUGINS`, names not
# imports. Each imports only light modules: every `kubegate` run (kubectl's `kubegate credential` before
# each request) builds the whole parser. Third-party plugins add theirs from the `kubegate` entry points.
DEFAULT_COMMANDS: tuple[str, ...] = (
    "kubegate.plugins.static_tokens_cli",
    "kubegate.sandbox.cli",
    "kubegate.plugins.policy_cli",
    "kubegate.plugins.login.cli",
    "kubegate.plugins.approvals_cli",
    "kubegate.plugins.recording.cli",
    "kubegate.plugins.audit.cli",
    "kubegate.connections.agent.cli",
    "kubegate.agent.cli",
)
ENTRY_POINT_GROUP = "kubegate"  # as kubegate.core.plugins.ENTRY_POINT_GROUP
# Commands run so often that only the module contributing them is loaded: kubectl runs `kubegate credential`
# before every request, and building the whole parser (every plugin's package, the entry points) costs more
# than the command itself. A plugin that contributes a command of these names is refused in the full parser.
FAST_COMMANDS: dict[str, str] = {"credential": "kubegate.plugins.login.cli"}


class CLIError(Exception):
    """A user-facing failure: printed as one line."""


OUTPUT_FORMATS = ("text", "json")
# `-o table` was the spelling of `tokens list` and `sessions list` (docs/recording.md); still read, not shown.
_LEGACY_OUTPUT = {"table": "text"}


def _output_format(value: str) -> str:
    if value in _LEGACY_OUTPUT:
        print(f"kubegate: -o {value} is now -o {_LEGACY_OUTPUT[value]}", file=sys.stderr)
        return _LEGACY_OUTPUT[value]
    return value


def add_output_argument(p: argparse.ArgumentParser) -> None:
    """`--output/-o text|json`: the one spelling of every command that prints data (`json` for scripts)."""
    p.add_argument("--output", "-o", type=_output_format, choices=OUTPUT_FORMATS, default="text",
                   help="text (default) or json")  # fmt: skip


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """`--config/-c`: the gateway's config file (commands that read the gateway's state read it from there)."""
    p.add_argument(
        "--config", "-c", default="kubegate.yaml", help="the gateway's config (default: kubegate.yaml)"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubegate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


class _VersionAction(argparse.Action):
    """`--version`, reading the installed version only when asked (not on every run)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.exit(message=f"kubegate {_version()}\n")


def _load(config: str) -> Gateway:
    from .gateway import Gateway

    return Gateway.from_config(Path(config))


def database_from_config(config: str) -> Database:
    """The gateway's database from the config's top level only (no plugins are loaded or validated)."""
    from .config import parse_settings
    from .db import Database, DatabaseError, default_url

    settings = parse_settings(Path(config))
    try:
        return Database(settings.database.url or default_url(settings.state_dir))
    except DatabaseError as exc:
        raise ConfigError(config, "database.url", str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import parse_settings, worker_count

    settings = parse_settings(Path(args.config))
    metrics_dir = None
    if worker_count(settings) > 1:
        # Before prometheus-client is first imported (by the gateway's modules): it picks its value store
        # once, and the workers must share theirs.
        metrics_dir = _multiprocess_metrics_dir(settings.state_dir)
    try:
        return _serve(args)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    from .config import worker_count
    from .observe import setup_logging
    from .server import StartupError, run

    gateway = _load(args.config)
    setup_logging(gateway.settings.log_level, gateway.settings.log_format, worker_count(gateway.settings) > 1)
    try:
        run(gateway, bind=args.bind, announce=lambda line: print(line, file=sys.stderr, flush=True))
    except StartupError as exc:
        raise CLIError(f"cannot start: {exc}") from None
    except OSError as exc:
        raise CLIError(
            f"cannot serve on {args.bind or gateway.settings.listen}: {exc.strerror or exc}"
        ) from None
    return 0


def _multiprocess_metrics_dir(state_dir: Path) -> Path:
    """A fresh private directory for the workers' metric files (STATE_DIR/metrics-PID-XXXX), set as
    PROMETHEUS_MULTIPROC_DIR. Directories a supervisor that no longer runs left behind are removed."""
    import os
    import tempfile

    if "prometheus_client" in sys.modules:  # pragma: no cover - a programming error, not a user's
        raise CLIError("internal: prometheus_client was imported before the metrics directory was set")
    state_dir.mkdir(parents=True, exist_ok=True)
    for old in state_dir.glob("metrics-*-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"metrics-{os.getpid()}-", dir=state_dir))  # mode 0700
    except OSError as exc:
        raise CLIError(f"cannot make a metrics directory in {state_dir}: {exc.strerror or exc}") from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def _running(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    if args.output == "json":
        listed = [
            {"name": info.name, "origin": info.origin, "module": info.module, "hooks": list(info.hooks)}
            | ({"enabled_on": enabled.get(info.name, [])} if args.config else {})
            for info in host.describe()
        ]
        print(json.dumps(listed, indent=2))
        return 0
    for info in host.describe():
        where = ", ".join(enabled.get(info.name, [])) or ("-" if args.config else "")
        print(f"{info.name:<16} {info.origin:<10} {info.module}")
        print(f"{'':<16} hooks: {', '.join(h.removeprefix('kubegate_') for h in info.hooks)}")
        if args.config:
            print(f"{'':<16} enabled on: {where}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .db import DatabaseError, head_revision

    database = database_from_config(args.config)
    try:
        if args.db_command == "status":
            state = database.schema_state()
            if args.output == "json":
                print(json.dumps({"revision": database.revision(), "head": head_revision(), "schema": state}))
                return 0 if state == "current" else 1
            print(f"revision: {database.revision() or 'none'} (this kubegate: {head_revision()})")
            print("schema: up to date" if state == "current" else f"schema: {state}")
            return 0 if state == "current" else 1
        before, after = database.upgrade()
    except (DatabaseError, SQLAlchemyError) as exc:
        raise CLIError(f"cannot upgrade the database: {str(exc).splitlines()[0]}") from None
    finally:
        database.close()
    print(
        f"database schema: {before or 'empty'} -> {after}"
        if before != after
        else f"database schema: {after}, up to date"
    )
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole `kubegate` parser; for `command` in `FAST_COMMANDS`, one with that command's module only."""
    parser = argparse.ArgumentParser(prog="kubegate", description="An access gateway for Kubernetes.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in FAST_COMMANDS:
        _register_commands(sub, [FAST_COMMANDS[command]], entry_points=False)
        return parser

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", default="kubegate.yaml", help="config file (default: kubegate.yaml)")
    serve.add_argument("--bind", help="HOST:PORT, overriding `listen` in the config")
    serve.set_defaults(func=cmd_serve)

    kubeconfig = sub.add_parser(
        "kubeconfig", help="print a kubeconfig that reaches a connection through the gateway"
    )
    add_config_argument(kubeconfig)
    kubeconfig.add_argument("--connection", required=True, help="the connection (cluster) to reach")
    kubeconfig.add_argument("--user", default="me", help="name of the kubeconfig user entry")
    kubeconfig.add_argument("--token", help="the user's gateway token")
    kubeconfig.add_argument("--token-file", help="file holding the user's gateway token")
    kubeconfig.add_argument("--ca-file", help="CA to trust (default: the gateway's generated CA, if any)")
    kubeconfig.set_defaults(func=cmd_kubeconfig)

    plugins = sub.add_parser("plugins", help="list installed plugins and where each is enabled")
    plugins.add_argument("--config", "-c", help="also show which connections enable each plugin")
    add_output_argument(plugins)
    plugins.set_defaults(func=cmd_plugins)

    db = sub.add_parser("db", help="the gateway's database schema (migrations)")
    db_sub = db.add_subparsers(dest="db_command", metavar="upgrade|status", required=True)
    for name, text in [("upgrade", "bring the schema to this kubegate's revision (back up first)"),
                       ("status", "the schema's revision, and whether this kubegate can use it")]:  # fmt: skip
        p = db_sub.add_parser(name, help=text)
        add_config_argument(p)
        if name == "status":
            add_output_argument(p)
        p.set_defaults(func=cmd_db)

    add_plugin_commands(sub)
    return parser


def add_plugin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every `kubegate_cli_commands`: the built-in command modules (`DEFAULT_COMMANDS`), then the plugins of
    the `kubegate` entry points, on a plugin manager of their own (the gateway's plugin host is not loaded).
    A command name taken twice is a plugin's bug: it stops the command line."""
    _register_commands(sub, DEFAULT_COMMANDS, entry_points=True)


def _register_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], modules: Iterable[str], *, entry_points: bool
) -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in modules:
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for impl in pm.hook.kubegate_cli_commands.get_hookimpls():  # registration order
        try:
            impl.function(sub)
        except argparse.ArgumentError as exc:  # a name taken twice (argparse refuses it)
            raise SystemExit(f"kubegate: error: plugin {impl.plugin_name}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except (ConfigError, CLIError) as exc:
        print(f"kubegate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m kubegate.core.cli`: run the imported module's main, so that the CLIError plugins' commands
    # raise (from `kubegate.core.cli`) is the one caught.
    from kubegate.core.cli import main as cli_main

    sys.exit(cli_main())
