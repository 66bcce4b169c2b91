"""Operating agent connections: a SIGHUP reload keeps the tunnels, /metrics and the UI's connection list show
the agents, `kubegate agents list` reads them from the database."""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GATEWAY_USERS, stop_process
from e2e.agent_stack import AGENT_CONNECTION, AgentStack, kubegate, start_agent_stack
from kubetest import gateway_api, run_kubectl


@pytest.fixture(scope="module")
def stack(sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentStack]:
    stack = start_agent_stack(sandbox, tmp_path_factory.mktemp("agent-ops"), plugins={"ui": {}})
    yield stack
    stack.agent.stop()
    stop_process(stack.gateway.process)


def _metrics(stack: AgentStack) -> str:
    ctx = ssl.create_default_context(cafile=str(stack.gateway.ca_file))
    with urllib.request.urlopen(f"{stack.gateway.url}/metrics", context=ctx, timeout=10) as resp:
        return resp.read().decode()


def _tunnels_up(agent_log: Path) -> int:
    return agent_log.read_text().count("tunnel to 127.0.0.1")


def test_reload_keeps_the_tunnel(stack: AgentStack):
    before = _tunnels_up(stack.agent.log)
    assert before >= 1
    stack.gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "configuration reloaded" not in stack.gateway.log.read_text():
        assert time.monotonic() < deadline, stack.gateway.log.read_text()[-2000:]
        time.sleep(0.2)
    result = run_kubectl(stack.kubeconfig(), "get", "namespaces", "-o", "name")
    assert result.returncode == 0, result.stderr
    assert "namespace/default" in result.stdout
    # The listener outlived the reload: the agent never had to dial again.
    assert _tunnels_up(stack.agent.log) == before
    assert "closed; reconnecting" not in stack.agent.log.read_text()


def test_metrics_show_the_agent(stack: AgentStack):
    run_kubectl(stack.kubeconfig(), "get", "pods", "-A")
    text = _metrics(stack)
    assert f'kubegate_agent_tunnels{{agent="edge-1",connection="{AGENT_CONNECTION}"}} 1.0' in text
    assert 'kubegate_agent_channels_opened_total{agent="edge-1"}' in text
    assert 'kubegate_agent_connected_since_seconds{agent="edge-1"}' in text


def test_ui_connection_list_shows_agent_status(stack: AgentStack):
    status, body = gateway_api(stack.gateway, "GET", "/api/connections", GATEWAY_USERS["alice"][1])
    assert status == 200, body
    (item,) = [c for c in body["items"] if c["name"] == AGENT_CONNECTION]
    assert item["type"] == "agent"
    assert item["upstream"]["state"] == "connected"
    assert [a["agent"] for a in item["upstream"]["agents"]] == ["edge-1"]
    assert item["upstream"]["agents"][0]["version"].startswith("kubegate-agent_")


def test_agents_list_reads_the_database(stack: AgentStack):
    out = kubegate("agents", "list", "-c", str(stack.gateway.config), "-o", "json").stdout
    data = json.loads(out)
    agents = data if isinstance(data, list) else data.get("items", data.get("agents"))
    (agent,) = [a for a in agents if a["name"] == "edge-1"]
    assert agent["connections"] == [AGENT_CONNECTION]
    assert len(agent["tunnels"]) == 1
    assert agent["tunnels"][0]["version"].startswith("kubegate-agent_")


def test_readyz_names_the_agent_connection(stack: AgentStack):
    ctx = ssl.create_default_context(cafile=str(stack.gateway.ca_file))
    with urllib.request.urlopen(f"{stack.gateway.url}/readyz", context=ctx, timeout=10) as resp:
        report = json.loads(resp.read())
    assert report["connections"][AGENT_CONNECTION] == "ok"
