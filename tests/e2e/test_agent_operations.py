"""Operating agent connections: a SIGHUP reload keeps the tunnels, /metrics and the UI's connection list show
the agents, `kubegate agents list` reads them from the database."""

from __future__ import annotations

import json
import re
import signal
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GATEWAY_USERS, stop_process
from e2e.agent_stack import AGENT_CONNECTION, AgentStack, kubegate, start_agent_stack
from kubetest import Background, gateway_api, run_kubectl, wait_for


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
    wait_for(lambda: "configuration reloaded" in stack.gateway.log.read_text(), "the gateway to log the reload",
             timeout=20)  # fmt: skip
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
    # The requests went over data links (TLS), not SSH channels: aiohttp still holds the kubectl request's.
    links_open = re.search(r'^kubegate_agent_links_open\{agent="edge-1"\} (\S+)$', text, re.M)
    assert links_open is not None and float(links_open.group(1)) >= 1, text
    assert "no data link" not in stack.gateway.log.read_text()
    assert 'kubegate_agent_connected_since_seconds{agent="edge-1"}' in text


def test_ui_connection_list_shows_agent_status(stack: AgentStack):
    status, body = gateway_api(stack.gateway, "GET", "/api/connections", GATEWAY_USERS["alice"][1])
    assert status == 200, body
    (item,) = [c for c in body["items"] if c["name"] == AGENT_CONNECTION]
    assert item["type"] == "agent"
    assert item["upstream"]["state"] == "connected"
    assert [a["agent"] for a in item["upstream"]["agents"]] == ["edge-1"]
    assert item["upstream"]["agents"][0]["version"].startswith("kubegate-agent_")
    assert item["upstream"]["agents"][0]["links"] is True


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


def test_one_agent_serves_two_connections_and_two_agents_serve_one(sandbox, tmp_path: Path):
    """`prod` and `staging` through one agent (its config names both clusters); `staging` also through a second
    agent — the gateway spreads its channels over both, and loses nothing when one of them goes."""
    import yaml
    from conftest import free_port, start_gateway
    from e2e.agent_stack import agent_gateway_config, join_token, start_agent, wait_ready

    ssh_port = free_port()
    config = agent_gateway_config(sandbox, tmp_path / "gateway", ssh_port)
    edge = config["connections"].pop(AGENT_CONNECTION)
    config["connections"] = {"prod": edge, "staging": edge}
    gateway = start_gateway(tmp_path / "gateway", config)
    address = [f"127.0.0.1:{ssh_port}"]
    first = join_token(gateway.config, "multi", "prod", "staging")
    second = join_token(gateway.config, "spare", "staging")
    agents = [
        start_agent(tmp_path / "multi", sandbox, name="multi", gateways=address, host_key=first["host_key"],
                    token=first["token"], connections=("prod", "staging")),
        start_agent(tmp_path / "spare", sandbox, name="spare", gateways=address, host_key=second["host_key"],
                    token=second["token"], connections=("staging",)),
    ]  # fmt: skip
    try:
        for name in ("prod", "staging"):
            wait_ready(gateway, name, agent=agents[0])

        def staging_agents() -> int:
            _status, body = gateway_api(gateway, "GET", "/api/connections", GATEWAY_USERS["alice"][1])
            staging = [c for c in body.get("items", []) if c["name"] == "staging"]
            return len(staging[0]["upstream"]["agents"]) if staging else 0

        wait_for(lambda: staging_agents() == 2, "both agents' tunnels registered for staging", timeout=20)
        for name in ("prod", "staging"):
            result = run_kubectl(gateway.kubeconfig("alice", name), "get", "pods", "-n", "prod", "-o", "name")
            assert result.returncode == 0, result.stderr
        # Channels held open at once (watches) are spread over both agents (round robin on each new channel);
        # each agent logs its own lines (when a request ends).
        watches = [Background(["kubectl", "get", "pods", "-n", "prod", "-w"], gateway.kubeconfig("alice", "staging"))
                   for _ in range(4)]  # fmt: skip
        try:
            for watch in watches:
                watch.read_until(r"\n")  # the first line: the watch is open
        finally:
            for watch in watches:
                watch.proc.terminate()
                watch.proc.wait(10)

        def connections_served(agent: str) -> set[str]:  # an agent writes its line when a channel ends
            path = tmp_path / agent / "agent-audit.jsonl"
            return (
                {json.loads(line)["connection"] for line in path.read_text().splitlines()}
                if path.exists()
                else set()
            )

        wait_for(
            lambda: connections_served("multi") == {"prod", "staging"},
            "agent multi's lines for prod and staging",
            ignore=(ValueError,),  # a line still being written
        )
        wait_for(
            lambda: connections_served("spare") == {"staging"},
            "agent spare's lines for staging",
            ignore=(ValueError,),
        )
        # One agent goes: staging keeps working through the other.
        agents[1].stop(kill=True)
        for _ in range(3):
            result = run_kubectl(gateway.kubeconfig("alice", "staging"), "get", "ns", "-o", "name")
            assert result.returncode == 0, result.stderr
        assert yaml.safe_load((tmp_path / "multi" / "agent.yaml").read_text())["connections"].keys() == {
            "prod",
            "staging",
        }
    finally:
        for agent in agents:
            agent.stop()
        stop_process(gateway.process)


def test_two_agent_pods_sharing_one_identity(sandbox, tmp_path: Path):
    """The HA Deployment of docs/agent.md: two agent processes with the same identity (the same Secret) both
    hold tunnels; metrics add them up under one agent; either one going leaves the other serving."""
    import shutil

    from conftest import free_port, start_gateway
    from e2e.agent_stack import agent_gateway_config, join_token, start_agent, wait_ready

    ssh_port = free_port()
    gateway = start_gateway(
        tmp_path / "gateway", agent_gateway_config(sandbox, tmp_path / "gateway", ssh_port)
    )
    address = [f"127.0.0.1:{ssh_port}"]
    joined = join_token(gateway.config, "pair")
    first = start_agent(tmp_path / "pod-a", sandbox, name="pair", gateways=address, host_key=joined["host_key"],
                        token=joined["token"])  # fmt: skip
    second = None
    try:
        wait_ready(gateway, agent=first)
        (tmp_path / "pod-b").mkdir()
        shutil.copy(
            tmp_path / "pod-a" / "id_ed25519", tmp_path / "pod-b" / "id_ed25519"
        )  # one Secret, two pods
        second = start_agent(tmp_path / "pod-b", sandbox, name="pair", gateways=address,
                             host_key=joined["host_key"], token=None)  # fmt: skip
        wait_for(lambda: 'kubegate_agent_tunnels{agent="pair",connection="edge"} 2.0' in _metrics_of(gateway),
                 "kubegate_agent_tunnels of agent pair to reach 2", timeout=20)  # fmt: skip
        agents = json.loads(kubegate("agents", "list", "-c", str(gateway.config), "-o", "json").stdout)
        (pair,) = [
            a for a in (agents if isinstance(agents, list) else agents["agents"]) if a["name"] == "pair"
        ]
        assert len(pair["tunnels"]) == 2
        first.stop(kill=True)
        for _ in range(3):
            result = run_kubectl(gateway.kubeconfig("alice", AGENT_CONNECTION), "get", "ns", "-o", "name")
            assert result.returncode == 0, result.stderr
    finally:
        first.stop()
        if second is not None:
            second.stop()
        stop_process(gateway.process)


def _metrics_of(gateway) -> str:
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    with urllib.request.urlopen(f"{gateway.url}/metrics", context=ctx, timeout=10) as resp:
        return resp.read().decode()
