"""The `kubegate` command line as a user meets it (issue 16): one `--output text|json` on every command that
prints data, help on every flag, `--no-browser` only where a browser opens, `kubegate approvals` after
`kubegate login` without flags, `kubegate credential` loading only what it needs, `policy check` seeing a
static-token user as the gateway does, the demo's ports."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubegate.core.cli import build_parser, main

KUBEGATE = str(Path(sys.executable).parent / "kubegate")


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command of the parser: ("kubegate tokens list", its parser)."""
    yield " ".join(("kubegate", *path)), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


ALL_COMMANDS = dict(commands(build_parser()))
# Commands that print data (a listing, a record, a decision): each takes --output text|json.
PRINT_DATA = [
    "kubegate plugins",
    "kubegate db status",
    "kubegate static-token",
    "kubegate policy check",
    "kubegate tokens list",
    "kubegate approvals list",
    "kubegate approvals show",
    "kubegate grants list",
    "kubegate sessions list",
    "kubegate audit search",
    "kubegate audit commands",
    "kubegate agents join-token",
    "kubegate agents list",
]


def test_every_flag_positional_and_subcommand_has_help():
    missing = []
    for name, parser in ALL_COMMANDS.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{name} {sub}" for sub in action.choices if sub not in helped]
            elif not action.help:  # argparse.SUPPRESS (a deliberately hidden flag) is a help too
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_walk_sees_a_flag_without_help():
    """The test above would pass on an empty walk: it must find a flag that lacks help when there is one."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sub.add_parser("x", help="x").add_argument("--nohelp")
    walked = dict(commands(parser))
    assert not options(walked["kubegate x"])["--nohelp"].help
    assert len(ALL_COMMANDS) > 30 and "kubegate tokens list" in ALL_COMMANDS


@pytest.mark.parametrize("name", PRINT_DATA)
def test_commands_that_print_data_take_one_output_vocabulary(name):
    output = options(ALL_COMMANDS[name])
    assert output.get("--output") is output.get("-o") is not None, name
    assert tuple(output["--output"].choices) == ("text", "json") and output["--output"].default == "text"


def test_no_other_spelling_of_the_output_format():
    for name, parser in ALL_COMMANDS.items():
        flags = options(parser)
        assert not {"--json", "--format", "--table", "--yaml"} & set(flags), name
        if "--output" in flags:
            assert tuple(flags["--output"].choices) == ("text", "json"), name
            assert name in PRINT_DATA, f"{name} prints data: list it in PRINT_DATA"


@pytest.mark.parametrize("command", [["tokens", "list"], ["sessions", "list"]])
def test_the_old_table_spelling_still_reads_as_text(command, capsys):
    args = build_parser().parse_args([*command, "-o", "table"])
    assert args.output == "text"
    assert "-o table is now -o text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "-o", "yaml"])


def test_no_browser_only_where_a_browser_may_open():
    having = {name for name, parser in ALL_COMMANDS.items() if "--no-browser" in options(parser)}
    assert having == {"kubegate login", "kubegate credential"}


def test_plugins_and_db_status_print_json(tmp_path):
    listed = subprocess.run([KUBEGATE, "plugins", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert "kubegate_authenticate" in plugins["static-tokens"]["hooks"]
    config = policy_config(tmp_path)
    status = subprocess.run([KUBEGATE, "db", "status", "-c", str(config), "-o", "json"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert status.returncode == 1, status.stderr  # an empty database is not up to date
    assert json.loads(status.stdout)["schema"] != "current" and json.loads(status.stdout)["revision"] is None


# --- kubegate credential: what kubectl runs before every request ------------------------------------------


def test_credential_loads_only_the_login_client(tmp_path):
    """Not every plugin's package (pydantic models, the database layer) nor the entry points: a behaviour
    check of the fast path, not a timing (tests assert no wall-clock times)."""
    env = {**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path)}
    script = """
import json, sys, time
sys.argv = ["kubegate", "credential", "--gateway", "https://gw.example", "--connection", "prod"]
from kubegate.plugins.login.client import Target, write_cached
write_cached(Target("https://gw.example", "prod"), {"token": "kgt_t", "expires_at": time.time() + 3600})
before = set(sys.modules)
from kubegate.core.cli import main
code = main()
print(json.dumps(sorted(set(sys.modules) - before)), file=sys.stderr)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"]["token"] == "kgt_t"
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert "pydantic" not in loaded and "yaml" not in loaded and "sqlalchemy" not in loaded
    assert not [m for m in loaded if m.startswith(("kubegate.plugins.recording", "kubegate.plugins.audit",
                                                   "kubegate.connections", "kubegate.sandbox"))]  # fmt: skip


def test_a_command_named_credential_by_a_plugin_is_still_refused(tmp_path):
    """The fast path skips the other command modules; the full parser still refuses a second `credential`."""
    from kubegate.core import cli

    class Clash:
        @cli.hookimpl
        def kubegate_cli_commands(self, subparsers):
            subparsers.add_parser("credential", help="a clash")

    sys.modules["h7_clash"] = Clash()  # type: ignore[assignment]
    try:
        with pytest.raises(SystemExit, match="credential"):
            saved = cli.DEFAULT_COMMANDS
            cli.DEFAULT_COMMANDS = (*saved, "h7_clash")
            try:
                build_parser()
            finally:
                cli.DEFAULT_COMMANDS = saved
    finally:
        del sys.modules["h7_clash"]


# --- kubegate approvals remembers the last kubegate login ----------------------------------------------


class FakeGateway:
    """Answers GET /api/approvals like the gateway; remembers each request's path and Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Authorization", "")))
                body = json.dumps({"items": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_gateways() -> Iterator[tuple[FakeGateway, FakeGateway]]:
    first, second = FakeGateway(), FakeGateway()
    yield first, second
    first.close()
    second.close()


def logged_in(monkeypatch, tmp_path, gateway: str, connection: str, ca_file: str | None = None) -> None:
    """What a successful `kubegate login` leaves behind: the cached token and the remembered target."""
    from kubegate.plugins.login.client import Target, remember_target, write_cached

    monkeypatch.setenv("KUBEGATE_CACHE_DIR", str(tmp_path / "cache"))
    target = Target(gateway, connection, ca_file)
    write_cached(target, {"token": f"kgt_{connection}", "expires_at": time.time() + 3600})
    remember_target(target)


def test_approvals_list_after_login_needs_no_flags(monkeypatch, tmp_path, fake_gateways, capsys):
    first, second = fake_gateways
    logged_in(monkeypatch, tmp_path, first.url, "prod")
    assert main(["approvals", "list", "--state", "all"]) == 0
    assert first.seen == [("/api/approvals?state=all", "Bearer kgt_prod")]
    assert capsys.readouterr().out.startswith("ID ")
    # A flag given wins over the remembered one: another gateway (whose token is cached too).
    from kubegate.plugins.login.client import Target, write_cached

    write_cached(Target(second.url, "prod"), {"token": "kgt_second", "expires_at": time.time() + 3600})
    assert main(["approvals", "list", "--gateway", second.url]) == 0
    assert second.seen == [("/api/approvals?state=pending", "Bearer kgt_second")] and len(first.seen) == 1
    # The remembered file is the owner's only (it names a CA file that vouches for a gateway).
    from kubegate.plugins.login.client import remembered_path

    assert oct(remembered_path().stat().st_mode & 0o777) == "0o600"


def test_the_remembered_ca_goes_with_the_remembered_gateway_only(monkeypatch, tmp_path):
    from kubegate.plugins.login.cli import target_of

    ca = tmp_path / "ca.crt"
    ca.write_text("not parsed here")
    logged_in(monkeypatch, tmp_path, "https://gw.example", "prod", str(ca))
    remembered = target_of(build_parser().parse_args(["approvals", "list"]))
    assert (remembered.gateway, remembered.connection, remembered.ca_file) == (
        "https://gw.example",
        "prod",
        str(ca),
    )
    assert remembered.insecure is False
    elsewhere = target_of(
        build_parser().parse_args(["approvals", "list", "--gateway", "https://other.example"])
    )
    assert (elsewhere.gateway, elsewhere.connection, elsewhere.ca_file) == (
        "https://other.example",
        "prod",
        None,
    )
    other_connection = target_of(
        build_parser().parse_args(["approvals", "show", "ID", "--connection", "dev"])
    )
    assert (other_connection.connection, other_connection.ca_file) == ("dev", str(ca))


def test_approvals_without_flags_or_a_login_is_one_line(tmp_path):
    proc = subprocess.run([KUBEGATE, "approvals", "list"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path / "empty")})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "kubegate: error: no gateway given and none remembered: run kubegate login --gateway URL "
        "--connection NAME first, or give --gateway and --connection"
    )


def test_login_still_needs_its_flags(tmp_path):
    proc = subprocess.run([KUBEGATE, "login"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 2 and "--gateway" in proc.stderr


# --- kubegate policy check --as a static-token user ------------------------------------------------------


def policy_config(tmp_path: Path) -> Path:
    import hashlib

    def token(user: str, groups: list[str]) -> dict[str, Any]:
        return {"user": user, "groups": groups, "sha256": hashlib.sha256(user.encode()).hexdigest()}

    config = {
        "state_dir": str(tmp_path / "state"),
        "connections": {
            "prod": {
                "upstream": {"server": "https://127.0.0.1:1", "token_file": "token"},
                "plugins": {
                    "static-tokens": {
                        "tokens": [token("ci-bot", ["ci", "deployers"]), token("alice", ["developers"])]
                    },
                    "policy": {
                        "default": "allow",
                        "rules": [
                            {
                                "name": "bots-never-delete-in-prod",
                                "action": "deny",
                                "match": {"groups": ["ci"], "verbs": ["delete"], "namespaces": ["prod"]},
                                "message": "CI may not delete anything in prod",
                            }
                        ],
                    },
                },
            }
        },
    }
    (tmp_path / "token").write_text("gateway-token\n")
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def policy_check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEGATE, "policy", "check", "-c", str(config), "--connection", "prod", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_policy_check_takes_a_static_token_users_groups(tmp_path):
    config = policy_config(tmp_path)
    request = ["--", "kubectl", "delete", "pod", "web", "-n", "prod"]
    checked = policy_check(config, "--as", "ci-bot", "-o", "json", *request)
    assert checked.returncode == 0, checked.stderr
    answer = json.loads(checked.stdout)
    assert (answer["decision"], answer["rule"]) == ("deny", "bots-never-delete-in-prod")
    assert answer["identity"] == {"user": "ci-bot", "groups": ["ci", "deployers"], "method": "static-tokens",
                                  "source": "groups and method from ci-bot's static token on connection prod"}  # fmt: skip
    text = policy_check(config, "--as", "ci-bot", *request).stdout
    assert "as:       ci-bot (groups: ci, deployers; method: static-tokens)" in text
    assert "(groups and method from ci-bot's static token on connection prod)" in text
    assert "decision: deny by rule bots-never-delete-in-prod" in text
    # Flags given win, and say so; a name without a token is what the flags say.
    own = json.loads(
        policy_check(config, "--as", "ci-bot", "--group", "developers", "-o", "json", *request).stdout
    )
    assert own["decision"] == "allow" and own["identity"]["groups"] == ["developers"]
    assert own["identity"]["source"].startswith("from --group/--method, not from ci-bot's static token")
    nobody = json.loads(policy_check(config, "--as", "carol", "-o", "json", *request).stdout)
    assert nobody["identity"]["groups"] == [] and "carol has no static token" in nobody["identity"]["source"]


def test_policy_check_refuses_to_guess_between_two_tokens_of_one_user(tmp_path):
    import hashlib

    config = policy_config(tmp_path)
    doc = yaml.safe_load(config.read_text())
    doc["connections"]["prod"]["plugins"]["static-tokens"]["tokens"].append(
        {"user": "ci-bot", "groups": ["readonly"], "sha256": hashlib.sha256(b"second").hexdigest()}
    )
    config.write_text(yaml.safe_dump(doc))
    checked = policy_check(config, "--as", "ci-bot", "--", "kubectl", "delete", "pod", "web", "-n", "prod")
    assert checked.returncode == 2 and checked.stderr.count("\n") == 1
    assert (
        "ci-bot has 2 static tokens with different groups" in checked.stderr and "--group" in checked.stderr
    )


# --- the demo's ports -----------------------------------------------------------------------------------


def test_demo_port_in_use_is_one_line_naming_its_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--port", "--sandbox-port", "--idp-port"):
            args = ["--port", "0"] if flag != "--port" else []
            proc = subprocess.run([KUBEGATE, "demo", "--dir", str(tmp_path / "demo"), *args, flag, str(port)],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert (
                proc.stderr.strip()
                == f"kubegate: error: cannot start the demo: {flag} {port}: Address already in use"
            )
    same = subprocess.run([KUBEGATE, "demo", "--dir", str(tmp_path / "demo"), "--port", "18999", "--idp-port", "18999"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        same.stderr.strip() == "kubegate: error: --port and --idp-port are both 18999: give each its own port"
    )


def test_demo_help_documents_its_ports():
    text = subprocess.run([KUBEGATE, "demo", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--sandbox-port" in text and "--idp-port" in text and "make demo PORT=" in text


def test_make_demo_passes_its_ports_through():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["make", "-n", "demo", "PORT=18443", "SANDBOX_PORT=18444", "IDP_PORT=18445"], cwd=root,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = next(line for line in proc.stdout.splitlines() if "kubegate demo" in line).split()
    assert run[run.index("demo") + 1 :] == [
        "--port",
        "18443",
        "--sandbox-port",
        "18444",
        "--idp-port",
        "18445",
    ]
    plain = subprocess.run(
        ["make", "-n", "demo"], cwd=root, capture_output=True, text=True, timeout=60
    ).stdout
    assert next(line for line in plain.splitlines() if "kubegate demo" in line).split()[-1] == "demo"
