"""The example third-party plugin package (docs/examples/kubegate-example-plugin), installed with pip and
found through its `kubegate` entry point by a real `kubegate serve`, enabled on one connection only.

Also its hooks unit-tested with `kubegate.testing.make_flow`, as a plugin author would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GATEWAY_USERS, free_port, gateway_config
from kubetest import run_kubectl

try:
    from kubegate import testing
except ImportError:  # the kubegate.testing name is mapped in pyproject.toml; the module is core/testing.py
    from kubegate.core import testing

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "kubegate-example-plugin"
ALICE = GATEWAY_USERS["alice"][1]
TAG = "tagged-by-example"


def _offline_build_backend() -> bool:
    """setuptools builds wheels without network when it has bdist_wheel (setuptools >= 70.1, or `wheel`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --no-deps --target SITE` of the example package: a real install, entry point included."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "src"  # pip builds in the source folder: build from a copy, never from docs/
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    isolation = ["--no-build-isolation", "--no-index"] if _offline_build_backend() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "--target", str(site),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (site / "kubegate_example_plugin.py").is_file()
    (entry_points,) = site.glob("kubegate_example_plugin-*.dist-info/entry_points.txt")
    assert "example-header = kubegate_example_plugin" in entry_points.read_text()
    return site


@pytest.fixture(scope="module")
def gateway(sandbox, plugin_site, tmp_path_factory):
    """`kubegate serve` with the plugin enabled on `tagged` only; `sandbox` is the same upstream without it."""
    directory = tmp_path_factory.mktemp("gateway-example-plugin")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    config["connections"]["tagged"] = {
        "upstream": plain["upstream"],
        "plugins": {
            **plain["plugins"],
            "example-header": {"headers": {"X-Kubegate-Example": TAG}, "deny_verbs": ["delete"]},
        },
    }
    running = testing.start_gateway_process(config, directory, pythonpath=[plugin_site])
    yield running
    running.stop()


def _kubeconfig(gateway, connection: str) -> Path:
    return testing.write_kubeconfig(gateway, connection, "alice", ALICE)


def test_kubegate_plugins_lists_it_with_its_entry_point(gateway, plugin_site):
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    kubegate = Path(sys.executable).parent / "kubegate"
    proc = subprocess.run(
        [str(kubegate), "plugins", "--config", str(gateway.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("\nexample-header ", 1)[1]
    first, hooks, enabled = block.splitlines()[:3]
    assert "entry point (kubegate-example-plugin)" in first and "kubegate_example_plugin" in first
    assert "decide" in hooks and "upstream_request" in hooks and "plugin_settings" in hooks
    assert enabled.strip() == "enabled on: tagged"


def test_the_header_reaches_the_api_server_only_from_the_enabled_connection(gateway, sandbox):
    def headers_of_requests(connection: str) -> list[list[str]]:
        before = sandbox.requests_log()
        since = before[-1]["id"] if before else 0
        run_kubectl(_kubeconfig(gateway, connection), "get", "configmaps", "-n", "prod", check=True)
        records = [r for r in sandbox.requests_log(since) if "/configmaps" in r["path"]]
        assert records, "kubectl's request did not reach the sandbox"
        return [r["headers"].get("x-kubegate-example", []) for r in records]

    assert all(values == [TAG] for values in headers_of_requests("tagged"))
    assert all(values == [] for values in headers_of_requests("sandbox"))


def test_kubectl_delete_is_refused_only_where_enabled(gateway):
    tagged, plain = _kubeconfig(gateway, "tagged"), _kubeconfig(gateway, "sandbox")
    run_kubectl(tagged, "create", "configmap", "example-plugin-cm", "-n", "dev", check=True)
    proc = run_kubectl(tagged, "delete", "configmap", "example-plugin-cm", "-n", "dev")
    assert proc.returncode == 1
    assert "Error from server (Forbidden): delete is turned off on this connection" in proc.stderr
    # The same user, the same cluster, the connection without the plugin: the delete goes through.
    run_kubectl(plain, "delete", "configmap", "example-plugin-cm", "-n", "dev", check=True)


# ---------------------------------------------------------------------------------------------------------
# Unit tests of the same module with kubegate.testing (no gateway, no network)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def example_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("kubegate_example_plugin", None)
    import kubegate_example_plugin

    yield kubegate_example_plugin
    sys.modules.pop("kubegate_example_plugin", None)


def test_make_flow_drives_the_decide_hook(example_plugin):
    settings = {"example-header": {"deny_verbs": ["delete", "deletecollection"]}}
    flow = testing.make_flow(
        "DELETE", "/api/v1/namespaces/prod/pods/web", plugins=[example_plugin], settings=settings
    )
    assert flow.attributes.verb == "delete" and flow.attributes.namespace == "prod"
    decision = example_plugin.kubegate_decide(flow)
    assert decision is not None and decision.verdict == "deny"
    assert "delete is turned off" in decision.reason
    # deletecollection: a DELETE without a name; a GET is not refused.
    flow = testing.make_flow("DELETE", "/api/v1/namespaces/prod/pods", connection=flow.connection)
    assert flow.attributes.verb == "deletecollection"
    assert example_plugin.kubegate_decide(flow).verdict == "deny"
    flow = testing.make_flow("GET", "/api/v1/namespaces/prod/pods", connection=flow.connection)
    assert example_plugin.kubegate_decide(flow) is None


async def test_make_flow_connection_runs_the_hooks_enabled_on_it(example_plugin):
    # Through the connection's hook caller, as the gateway calls it: only enabled plugins answer.
    enabled = testing.make_connection("prod", plugins=[example_plugin], settings={"example-header": {}})
    flow = testing.make_flow("GET", "/api/v1/namespaces/prod/pods", connection=enabled)
    await flow.connection.hooks.upstream_request(flow)
    assert flow.upstream_headers == [("X-Kubegate-Example", "via-kubegate")]

    host_without = testing.make_connection("staging", plugins=[example_plugin], settings={})
    assert "example-header" in host_without.enabled_plugins  # listed plugins are enabled by default
    disabled = testing.make_connection(
        "staging", host=testing.PluginHost(load_entry_points=False, extra=[example_plugin])
    )
    flow = testing.make_flow("DELETE", "/api/v1/namespaces/prod/pods/web", connection=disabled)
    await flow.connection.hooks.upstream_request(flow)
    assert flow.upstream_headers == []
    assert await flow.connection.hooks.decide(flow) is None


def test_make_flow_validates_plugin_settings(example_plugin):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        testing.make_flow(plugins=[example_plugin], settings={"example-header": {"deny_verbs": "delete"}})
    with pytest.raises(ValueError, match="no plugin 'nope'"):
        testing.make_flow(settings={"nope": {}})


# The kubegate.testing fixture, loaded the way a plugin author's conftest.py would (pytest_plugins).
make_gateway_fixture = testing.make_gateway_fixture


def test_make_gateway_serves_a_plugin_object_in_process(sandbox, make_gateway, example_plugin):
    users = {"alice": (ALICE, ["developers"])}
    upstream = testing.sandbox_upstream(sandbox)
    tokens = testing.static_tokens(users)
    config = {
        "connections": {
            "tagged": {
                "upstream": upstream,
                "plugins": {"static-tokens": tokens, "example-header": {"deny_verbs": ["delete"]}},
            },
            "plain": {"upstream": upstream, "plugins": {"static-tokens": tokens}},
        }
    }
    gateway = make_gateway(config, plugins=[example_plugin], load_entry_points=False)
    proc = run_kubectl(
        gateway.kubeconfig("tagged", "alice", ALICE), "delete", "configmap", "nope", "-n", "dev"
    )
    assert proc.returncode == 1
    assert "Error from server (Forbidden): delete is turned off on this connection" in proc.stderr
    proc = run_kubectl(
        gateway.kubeconfig("plain", "alice", ALICE), "delete", "configmap", "nope", "-n", "dev"
    )
    assert proc.returncode == 1 and "(NotFound)" in proc.stderr  # reached the cluster
