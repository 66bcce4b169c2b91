"""The ``kubegate`` command.

Every failure a user can cause prints one line (``kubegate: error: ...``) and exits non-zero; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import importlib
import json
import secrets
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import ConfigError

EXIT_USAGE = 2
# Modules with `add_commands(subparsers)`; their handlers use `CLIError` and `database_from_config` from here.
PLUGIN_COMMANDS: tuple[str, ...] = (
    "kubegate.plugins.recording.cli",
    "kubegate.plugins.audit.cli",
    "kubegate.connections.agent.cli",
    "kubegate.agent.cli",
)


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


def database_from_config(config: str):
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


def _target(args: argparse.Namespace):
    from kubegate.plugins.login.client import Target

    gateway = args.gateway.rstrip("/")
    if not gateway.startswith(("https://", "http://")):
        raise CLIError(f"--gateway must be a URL such as https://kubegate.example.com, got {args.gateway!r}")
    if args.certificate_authority and not Path(args.certificate_authority).is_file():
        raise CLIError(f"no such file: {args.certificate_authority}")
    return Target(gateway, args.connection, args.certificate_authority, args.insecure_skip_tls_verify)


def _self_command() -> str:
    """How kubectl should run this program again (an absolute path when we know it)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "kubegate" and argv0.is_file():
        return str(argv0.resolve())
    return shutil.which("kubegate") or "kubegate"


def cmd_login(args: argparse.Namespace) -> int:
    from kubegate.plugins.login.client import ClientError, default_kubeconfig, login, update_kubeconfig

    target = _target(args)
    try:
        answer = login(target, open_browser=not args.no_browser)
        path = Path(args.kubeconfig) if args.kubeconfig else default_kubeconfig()
        context = update_kubeconfig(path, target, _self_command(), set_current=not args.no_set_context)
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
    from kubegate.plugins.login.client import ClientError, credential

    target = _target(args)
    try:
        answer = credential(target, open_browser=not args.no_browser)
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(answer))
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from kubegate.plugins.login.client import ClientError, logout

    try:
        revoked = logout(_target(args))
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    print(
        f"revoked token {revoked}" if revoked else "no cached token for this gateway and connection",
        file=sys.stderr,
    )
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from kubegate.core.db import DatabaseError
    from kubegate.plugins.login import store

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


def cmd_policy_check(args: argparse.Namespace) -> int:
    from kubegate.plugins.policy import PLUGIN_NAME, PolicySettings
    from kubegate.plugins.policy_check import CheckError, check

    from .flow import Identity

    gateway = _load(args.config)
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


def cmd_approvals(args: argparse.Namespace) -> int:
    from kubegate.plugins.approvals.client import describe, request, table, token_for
    from kubegate.plugins.login.client import ClientError

    target = _target(args)
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


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .db import DatabaseError, head_revision

    database = database_from_config(args.config)
    try:
        if args.db_command == "status":
            state = database.schema_state()
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

    policy = sub.add_parser("policy", help="policy tools")
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

    def add_target(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--gateway", required=True, help="the gateway's URL, e.g. https://kubegate.example.com"
        )
        p.add_argument("--connection", required=True, help="the connection (cluster) to use")
        p.add_argument("--certificate-authority", help="CA file to trust for the gateway's certificate")
        p.add_argument("--insecure-skip-tls-verify", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--no-browser", action="store_true", help="only print the URL to open (headless use)")

    login = sub.add_parser("login", help="log in through the browser and set up kubectl for a connection")
    add_target(login)
    login.add_argument("--kubeconfig", help="kubeconfig to update (default: $KUBECONFIG or ~/.kube/config)")
    login.add_argument("--no-set-context", action="store_true", help="don't make it the current context")
    login.set_defaults(func=cmd_login)

    cred = sub.add_parser("credential", help="kubectl exec credential plugin (set up by kubegate login)")
    add_target(cred)
    cred.set_defaults(func=cmd_credential)

    logout = sub.add_parser("logout", help="revoke and forget the cached token of a connection")
    add_target(logout)
    logout.set_defaults(func=cmd_logout)

    approvals = sub.add_parser("approvals", help="review held requests (with your kubegate login token)")
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
        add_target(p)
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
            p.add_argument("--output", "-o", choices=["text", "json"], default="text")
        p.set_defaults(func=cmd_approvals)

    grants = sub.add_parser("grants", help="list or revoke time-window grants (reads the gateway's database)")
    grants_sub = grants.add_subparsers(dest="grants_command", metavar="list|revoke", required=True)
    grants_list = grants_sub.add_parser("list", help="active grants (all with --all)")
    grants_list.add_argument("--config", "-c", default="kubegate.yaml")
    grants_list.add_argument("--all", action="store_true")
    grants_list.set_defaults(func=cmd_grants)
    grants_revoke = grants_sub.add_parser("revoke", help="end a grant now")
    grants_revoke.add_argument("--config", "-c", default="kubegate.yaml")
    grants_revoke.add_argument("id")
    grants_revoke.set_defaults(func=cmd_grants)

    tokens = sub.add_parser(
        "tokens", help="list or revoke gateway-issued tokens (reads the gateway's database)"
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="list|revoke", required=True)
    tokens_list = tokens_sub.add_parser("list", help="active tokens (all with --all)")
    tokens_list.add_argument("--config", "-c", default="kubegate.yaml")
    tokens_list.add_argument("--user", help="only this user's")
    tokens_list.add_argument("--all", action="store_true", help="include expired and revoked tokens")
    tokens_list.add_argument("--output", "-o", choices=["table", "json"], default="table")
    tokens_list.set_defaults(func=cmd_tokens)
    tokens_revoke = tokens_sub.add_parser("revoke", help="revoke a token by ID, or all of a user's")
    tokens_revoke.add_argument("--config", "-c", default="kubegate.yaml")
    tokens_revoke.add_argument("id", nargs="?", help="token ID (from tokens list)")
    tokens_revoke.add_argument("--user", help="revoke every active token of this user")
    tokens_revoke.set_defaults(func=cmd_tokens)

    db = sub.add_parser("db", help="the gateway's database schema (migrations)")
    db_sub = db.add_subparsers(dest="db_command", metavar="upgrade|status", required=True)
    for name, text in [("upgrade", "bring the schema to this kubegate's revision (back up first)"),
                       ("status", "the schema's revision, and whether this kubegate can use it")]:  # fmt: skip
        p = db_sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", default="kubegate.yaml")
        p.set_defaults(func=cmd_db)

    # Commands of built-in plugins that own their data (sessions, audit): each module adds its own.
    for module_name in PLUGIN_COMMANDS:
        module = importlib.import_module(module_name)
        module.add_commands(sub)
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
