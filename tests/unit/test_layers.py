"""Core knows no plugin (issue 16): what plugins contribute through hooks — audit fields, record renderings,
metrics, database models, commands — and what the host does when a plugin fails or is missing."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pluggy
import pytest

from kubegate.core import hookspecs
from kubegate.core.cli import add_plugin_commands
from kubegate.core.cli import hookimpl as cli_hookimpl
from kubegate.core.flow import Decision, Flow, Verdict
from kubegate.core.plugins import UNMASKED_ARGUMENT, CountingPluginManager, PluginHost, RecordHooks, hookimpl
from kubegate.core.proxy import _audit_data
from kubegate.testing import make_connection, make_flow

EXEC = "/api/v1/namespaces/prod/pods/web/exec"
EXEC_QUERY = "command=mysql&command=-pHUNTER2&container=db&stdout=true"


def bare_pm(manager: type[pluggy.PluginManager] = pluggy.PluginManager) -> pluggy.PluginManager:
    pm = manager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


# -- audit fields ------------------------------------------------------------------------------------------


def test_builtin_audit_fields_keep_their_keys_and_order_on_a_connection_that_enables_none_of_them():
    host = PluginHost(load_entry_points=False)
    flow = make_flow(connection=make_connection(host=host))
    data = _audit_data(flow, host.audit_fields(flow))
    keys = list(data)
    # Exactly where core put them before the hook: after `decision`, before `status`, None when unused.
    assert keys[keys.index("decision") + 1 : keys.index("status")] == ["policy", "approval", "masking"]
    assert data["policy"] is None and data["approval"] is None and data["masking"] is None


def test_audit_fields_carry_what_the_plugins_put_on_the_flow():
    host = PluginHost(load_entry_points=False)
    flow = make_flow(connection=make_connection(host=host))
    flow.state["policy"] = {"dry_run": [{"rule": "r", "action": "deny"}]}
    flow.state["approval"] = {"approval_id": "ap-1"}
    flow.state["masking"] = {
        "mode": "json",
        "render": "json",
        "encoding": "",
        "content_type": "application/json",
    }
    data = _audit_data(flow, host.audit_fields(flow))
    assert data["policy"] == flow.state["policy"]
    assert data["approval"] == {"approval_id": "ap-1"}
    assert data["masking"]["mode"] == "json"


class Forger:
    """A plugin that tries to rewrite what core records, and to take another plugin's key."""

    PLUGIN_NAME = "forger"

    @hookimpl
    def kubegate_audit_fields(self, flow):
        return {"status": 200, "identity": {"user": "someone-else"}, "decision": None, "error": None,
                "policy": "forged", "forger": "mine"}  # fmt: skip


class Broken:
    PLUGIN_NAME = "broken"

    @hookimpl
    def kubegate_audit_fields(self, flow):
        raise RuntimeError("boom")


def test_a_plugin_cannot_overwrite_what_core_or_another_plugin_records():
    host = PluginHost(load_entry_points=False, extra=[Forger()])
    flow = make_flow(connection=make_connection(host=host))
    flow.response.status = 403
    flow.decision = Decision(Verdict.DENY, "no", "rule")
    flow.state["policy"] = {"dry_run": []}
    data = _audit_data(flow, host.audit_fields(flow))
    assert data["status"] == 403 and data["identity"]["user"] == "alice"
    assert data["decision"]["verdict"] == "deny"
    assert data["policy"] == {"dry_run": []}  # the policy plugin registered first keeps its key
    assert data["forger"] == "mine"


class NoArguments:
    PLUGIN_NAME = "no-arguments"

    @hookimpl
    def kubegate_audit_fields(self):
        return {"constant": 1}


def test_audit_fields_follow_plugins_registered_and_removed_after_the_first_event():
    host = PluginHost(load_entry_points=False)
    flow = make_flow(connection=make_connection(host=host))
    assert "forger" not in host.audit_fields(flow)  # the implementations are remembered from here on
    host.register(Forger(), origin="extra")
    host.register(NoArguments(), origin="extra")  # an implementation may take no argument at all
    fields = host.audit_fields(flow)
    assert fields["forger"] == "mine" and fields["constant"] == 1
    host.pm.unregister(name="forger")
    assert "forger" not in host.audit_fields(flow) and host.audit_fields(flow)["constant"] == 1


def test_a_failing_audit_fields_plugin_loses_its_part_not_the_event():
    host = PluginHost(load_entry_points=False, extra=[Broken()])
    flow = make_flow(connection=make_connection(host=host))
    flow.state["approval"] = {"approval_id": "ap-2"}
    data = _audit_data(flow, host.audit_fields(flow))
    assert data["approval"] == {"approval_id": "ap-2"} and "status" in data


# -- record renderings: fail closed ------------------------------------------------------------------------


@pytest.mark.parametrize("manager", [pluggy.PluginManager, CountingPluginManager])
def test_without_a_masking_plugin_a_command_line_is_recorded_hidden_and_text_not_at_all(manager):
    flow = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True)
    records = RecordHooks(bare_pm(manager))
    assert records.command(flow, ["mysql", "-pHUNTER2"]) == [UNMASKED_ARGUMENT, UNMASKED_ARGUMENT]
    assert records.text(flow, b"password: HUNTER2\n") == b""
    stream = records.stream(flow)  # a recording's stream: nothing of it is stored
    assert stream.feed(b"password: HUNTER2\n") == b"" and stream.end() == b""


@pytest.mark.parametrize("manager", [pluggy.PluginManager, CountingPluginManager])
def test_a_failing_record_plugin_hides_the_command_line_and_drops_the_text(manager):
    class Failing:
        PLUGIN_NAME = "failing"

        @hookimpl
        def kubegate_record_command(self, flow, argv):
            raise RuntimeError("boom")

        @hookimpl
        def kubegate_record_text(self, flow, data):
            raise RuntimeError("boom")

    pm = bare_pm(manager)
    pm.register(Failing(), name="failing")
    flow = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True)
    assert RecordHooks(pm).command(flow, ["env", "DB_PASSWORD=HUNTER2"]) == [UNMASKED_ARGUMENT] * 2
    assert RecordHooks(pm).text(flow, b"HUNTER2") == b""


@pytest.mark.parametrize("manager", [pluggy.PluginManager, CountingPluginManager])
def test_a_record_stream_that_fails_stores_nothing_from_then_on(manager):
    class Failing:
        PLUGIN_NAME = "failing"

        def __init__(self) -> None:
            self.fed = 0

        def feed(self, chunk):
            self.fed += 1
            if self.fed == 2:
                raise RuntimeError("boom")
            return chunk

        def end(self):
            return b"HUNTER2"  # what it held: lost with it

        @hookimpl
        def kubegate_record_stream(self, flow):
            return self

    class FailingHook:
        PLUGIN_NAME = "failing-hook"

        @hookimpl
        def kubegate_record_stream(self, flow):
            raise RuntimeError("boom")

    flow = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True)
    pm = bare_pm(manager)
    pm.register(Failing(), name="failing")
    stream = RecordHooks(pm).stream(flow)
    assert stream.feed(b"ls\r") == b"ls\r"
    assert [stream.feed(b"HUNTER"), stream.feed(b"2\r"), stream.end()] == [b"", b"", b""]
    pm = bare_pm(manager)
    pm.register(FailingHook(), name="failing-hook")
    stream = RecordHooks(pm).stream(flow)
    assert stream.feed(b"HUNTER2\r") == b"" and stream.end() == b""


def test_the_masking_plugin_masks_command_lines_and_text_reached_from_a_flow():
    flow = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True)
    hooks = flow.connection.hooks
    assert "HUNTER2" not in " ".join(hooks.record_command(flow, ["mysql", "-pHUNTER2"]))
    assert hooks.record_command(flow, ["ls", "-l"]) == ["ls", "-l"]
    assert "HUNTER2" not in hooks.record_query(flow, EXEC_QUERY)
    assert hooks.record_query(flow, "container=db") == "container=db"
    # A recording's stream: a secret typed key by key is held until it is whole, and stored masked.
    stream = hooks.record_stream(flow)
    typed = b"".join(stream.feed(bytes([key])) for key in b"export DB_PASSWORD=HUNTER2\r") + stream.end()
    assert b"HUNTER" not in typed and typed.startswith(b"export DB_PASSWORD=") and typed.endswith(b"\r")


def test_masking_marks_the_flows_output_masked_except_for_an_exempt_caller():
    from kubegate.plugins.masking import Masking, MaskingSettings

    host = PluginHost(load_entry_points=False)
    connection = make_connection(host=host, settings={"masking": {}})
    # What the plugin's startup attaches (without following Secrets: no upstream here).
    connection.state["masking"] = Masking(
        MaskingSettings.model_validate({"exempt": {"users": ["breakglass"]}})
    )
    masking = host.plugin("masking")
    masked = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True, connection=connection)
    masking.kubegate_upstream_request(masked)
    assert masked.output_masked is True
    exempt = make_flow(
        "GET", EXEC, query=EXEC_QUERY, websocket=True, connection=connection, identity="breakglass"
    )
    masking.kubegate_upstream_request(exempt)
    assert exempt.output_masked is False
    unmasked = make_flow("GET", EXEC, query=EXEC_QUERY, websocket=True, connection=make_connection(host=host))
    masking.kubegate_upstream_request(unmasked)
    assert unmasked.output_masked is False  # a connection without masking: a recording masks the output


# -- approvals bind the same intent without the policy plugin ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", EXEC, EXEC_QUERY),
        ("POST", EXEC, "command=sh&command=-c&command=echo%20hi&stdin=true"),
        ("GET", "/api/v1/namespaces/prod/pods/web/attach", "container=db&stdin=true"),
        ("GET", "/api/v1/namespaces/prod/pods/web/portforward", "ports=5432"),
        ("DELETE", "/api/v1/namespaces/prod/pods/web", ""),
        ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/web/scale", ""),
        ("POST", "/api/v1/namespaces/prod/pods/web/eviction", ""),
        ("GET", "/api/v1/namespaces/prod/pods/web/log", "follow=true"),
    ],
)
def test_an_approval_intent_names_the_request_as_the_policy_does(method, path, query):
    from kubegate.plugins.approvals.service import intent_of
    from kubegate.plugins.policy import request_from_flow

    flow = make_flow(method, path, query=query, websocket=method == "GET" and "/exec" in path)
    req = request_from_flow(flow)
    fields = intent_of(flow, b"", "", Decision(Verdict.NEEDS_APPROVAL, rule="r")).fields
    assert (fields["verb"], fields["resource"], fields["namespace"], fields["name"], fields["command"]) == (
        req.verb, req.resource, req.namespace, req.name, req.command)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "content_type", "creates"),
    [
        ("PATCH", "/api/v1/namespaces/prod/pods/web", "application/apply-patch+yaml", True),
        ("PATCH", "/api/v1/namespaces/prod/pods/web", "application/merge-patch+json", False),
        (
            "PUT",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/prod/rolebindings/b",
            "application/json",
            True,
        ),
        ("PUT", "/api/v1/namespaces/prod/configmaps/c", "application/json", False),
    ],
)
def test_an_approval_intent_binds_whether_the_request_may_create(method, path, content_type, creates):
    """An approval of a merge patch must not release the same bytes sent as an apply that creates."""
    from kubegate.plugins.approvals.service import bound_media_type, intent_of
    from kubegate.plugins.policy import request_from_flow

    def intent(flow: Flow) -> Any:
        return intent_of(
            flow, b"{}", bound_media_type(flow, b"{}"), Decision(Verdict.NEEDS_APPROVAL, rule="r")
        )

    flow = make_flow(method, path, headers=[("content-type", content_type)])
    assert request_from_flow(flow).creates is creates
    assert intent(flow).fields.get("creates", False) is creates
    other = "application/merge-patch+json" if content_type.startswith("application/apply") else content_type
    same_bytes = make_flow(method, path, headers=[("content-type", other)])
    assert (intent(flow).hash == intent(same_bytes).hash) is (other == content_type)


# -- metrics -----------------------------------------------------------------------------------------------


async def test_a_failing_or_slow_metrics_plugin_does_not_stop_the_scrape(monkeypatch):
    import asyncio

    from kubegate.core import plugins as plugins_module

    calls = []

    class Failing:
        PLUGIN_NAME = "failing-metrics"

        @hookimpl
        async def kubegate_metrics(self, gateway):
            raise RuntimeError("database down")

    class Slow:
        PLUGIN_NAME = "slow-metrics"

        @hookimpl
        async def kubegate_metrics(self, gateway):
            await asyncio.sleep(60)

    class Counting:
        PLUGIN_NAME = "counting-metrics"

        @hookimpl
        def kubegate_metrics(self, gateway):
            calls.append(gateway)

    monkeypatch.setattr(plugins_module, "METRICS_SECONDS", 0.05)
    host = PluginHost(load_entry_points=False, extra=[Failing(), Slow(), Counting()])

    class NoApprovals:
        extensions: dict = {}

    gateway = NoApprovals()
    await host.metrics(gateway)
    assert calls == [gateway]


# -- database models ---------------------------------------------------------------------------------------


def test_the_database_models_hook_names_exactly_the_tables_the_migrations_make(tmp_path):
    from sqlalchemy import inspect

    from kubegate.core.db import Database, import_models

    hooked = {model.__tablename__ for model in import_models()}
    database = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    database.upgrade()
    migrated = {t for t in inspect(database.engine).get_table_names() if t.startswith("kubegate_")}
    database.close()
    assert hooked == migrated
    assert {"kubegate_tokens", "kubegate_approvals", "kubegate_audit_events", "kubegate_sessions",
            "kubegate_agents"} <= hooked  # fmt: skip


# -- commands ----------------------------------------------------------------------------------------------


def test_a_plugin_command_that_takes_a_builtin_name_stops_the_command_line_in_one_line(monkeypatch):
    import kubegate.core.cli as cli

    class Clash:
        @cli_hookimpl
        def kubegate_cli_commands(self, subparsers):
            subparsers.add_parser("credential")

    real_register = pluggy.PluginManager.load_setuptools_entrypoints

    def with_clash(self, group, name=None):
        self.register(Clash(), name="clash")
        return real_register(self, group, name)

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", with_clash)
    sub = argparse.ArgumentParser(prog="kubegate").add_subparsers()
    with pytest.raises(SystemExit, match=r"^kubegate: error: plugin clash: .*credential"):
        add_plugin_commands(sub)
    assert cli.DEFAULT_COMMANDS  # the built-ins were added first


def test_core_commands_and_every_builtin_plugins_commands_are_there():
    from kubegate.core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "kubeconfig", "plugins", "db", "static-token", "demo", "policy", "login", "credential",
            "logout", "tokens", "approvals", "grants", "sessions", "replay", "audit", "agents",
            "agent"} <= set(sub.choices)  # fmt: skip


def test_python_dash_m_core_cli_reports_a_plugin_commands_error_in_one_line(tmp_path):
    config = tmp_path / "missing.yaml"
    run = subprocess.run([sys.executable, "-m", "kubegate.core.cli", "grants", "list", "--config", str(config)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and run.stderr.startswith("kubegate: error:"), run.stderr
    assert "Traceback" not in run.stderr


# -- the import contracts ([tool.importlinter] in pyproject.toml, `make lint`) ------------------------------

REPO = Path(__file__).resolve().parents[2]


def importlinter_contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def expression_matches(expression: str, module: str) -> bool:
    """import-linter's module expressions: `*` is one segment of the name, `**` one or more."""
    pattern = r"\.".join(
        "[^.]+" if part == "*" else ".+" if part == "**" else re.escape(part)
        for part in expression.split(".")
    )
    return re.fullmatch(pattern, module) is not None


def plugins_folder_modules() -> list[str]:
    """Every module and package directly in plugins/, by its installed name."""
    names = [path.stem for path in (REPO / "plugins").glob("*.py") if path.stem != "__init__"]
    names += [path.parent.name for path in (REPO / "plugins").glob("*/__init__.py")]
    return sorted(f"kubegate.plugins.{name}" for name in names)


def not_independent(contract: dict) -> list[str]:
    """The modules of plugins/ that the independence contract does not name."""
    return [
        m for m in plugins_folder_modules() if not any(expression_matches(e, m) for e in contract["modules"])
    ]


def test_every_module_in_plugins_is_in_the_plugin_independence_contract():
    contract = next(c for c in importlinter_contracts() if c["name"] == "each plugin imports no other plugin")
    assert contract["type"] == "independence"
    modules = plugins_folder_modules()
    # The folder is read (not a list that would go stale): the plugins, their command modules, policy_check.
    assert {"kubegate.plugins.oidc", "kubegate.plugins.masking", "kubegate.plugins.policy_check",
            "kubegate.plugins.policy_cli", "kubegate.plugins.approvals_cli"} <= set(modules)  # fmt: skip
    assert not_independent(contract) == []


def test_a_plugin_left_out_of_the_independence_contract_is_reported():
    # The check above can fail: a list naming the plugins of the day misses the command modules and any
    # plugin added since.
    listed = {"type": "independence", "modules": ["kubegate.plugins.oidc", "kubegate.plugins.mas*"]}
    missing = not_independent(listed)
    assert "kubegate.plugins.policy_check" in missing and "kubegate.plugins.approvals_cli" in missing
    assert "kubegate.plugins.oidc" not in missing and "kubegate.plugins.masking" in missing
    assert expression_matches("kubegate.plugins.*", "kubegate.plugins.mcp")
    assert not expression_matches("kubegate.plugins.*", "kubegate.plugins.login.oidc_flow")
    assert expression_matches("kubegate.plugins.**", "kubegate.plugins.login.oidc_flow")


def test_core_has_no_exception_to_its_layer():
    contract = next(c for c in importlinter_contracts() if c.get("source_modules") == ["kubegate.core"])
    assert contract["type"] == "forbidden"
    assert "kubegate.plugins" in contract["forbidden_modules"]
    assert "kubegate.connections" in contract["forbidden_modules"]
    assert not contract.get("ignore_imports")
