"""Where the agent earns its keep: a cluster the gateway cannot reach at all (a network namespace of its own,
reached only by the agent dialing out), and one agent serving two gateway replicas that share a PostgreSQL
database (one pinned host key, one tunnel per replica, either replica alone keeps serving)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Sandbox, free_port, start_gateway, stop_process
from e2e.agent_stack import (
    AGENT_CONNECTION,
    AgentProcess,
    agent_gateway_config,
    agents_list,
    join_token,
    readiness,
    start_agent,
    wait_for_log,
    wait_ready,
    write_agent_config,
)
from kubetest import run_kubectl

# -- a network namespace of the test's own ----------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    """Why this machine cannot run the isolation test, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"kg-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Namespace:
    """`ip netns` NS with a veth pair: the host end HOST_ADDRESS/30, the namespace end NS_ADDRESS/30."""

    def __init__(self) -> None:
        tag = os.urandom(3).hex()
        self.name = f"kg-agent-{tag}"
        self.host_link, self.ns_link = f"kgh{tag}", f"kgn{tag}"
        for _ in range(50):  # a /30 in 10.200-250.* that nothing on this machine uses
            prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
            in_use = ip("-4", "addr", "show", "to", f"{prefix}.0/30").stdout + ip("-4", "route", "show", "to",
                                                                                   f"{prefix}.0/30").stdout  # fmt: skip
            if not in_use.strip():
                break
        self.host_address, self.ns_address = f"{prefix}.1", f"{prefix}.2"
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
            ip("link", "set", self.ns_link, "netns", self.name)
            ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            ip("link", "set", self.host_link, "up")
            self.run("ip", "addr", "add", f"{self.ns_address}/30", "dev", self.ns_link)
            self.run("ip", "link", "set", self.ns_link, "up")
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=30, check=True)

    def delete(self) -> None:
        ip("link", "del", self.host_link, check=False)  # its peer goes with it
        ip("netns", "del", self.name, check=False)


def start_sandbox_in(namespace: Namespace, directory: Path) -> Sandbox:
    """The sandbox cluster on the namespace's loopback (as conftest.start_sandbox, inside `ip netns exec`)."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        namespace.command(sys.executable, "-m", "kubegate.sandbox", "serve", "--dir", str(directory), "--port", "0"),
        stdout=subprocess.PIPE, stderr=open(directory / "sandbox.log", "wb"), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline and not line.startswith("{"):
        line = proc.stdout.readline()
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox exited: {(directory / 'sandbox.log').read_text()}")
    info = json.loads(line)
    return Sandbox(dir=directory, url=info["url"], port=info["port"], kubeconfig=Path(info["kubeconfig"]),
                   token=info["token"], ca_file=Path(info["ca_file"]), process=proc)  # fmt: skip


def start_agent_in(namespace: Namespace, directory: Path, sandbox: Sandbox, *, name: str, gateways: list[str],
                   host_key: str, token: str) -> AgentProcess:  # fmt: skip
    """An agent (agent.yaml as `start_agent` writes it) running inside the namespace."""
    config = write_agent_config(directory, sandbox, name=name, gateways=gateways, host_key=host_key)
    log = directory / "agent.log"
    kubegate = str(Path(sys.executable).parent / "kubegate")
    proc = subprocess.Popen(namespace.command(kubegate, "agent", "--config", str(config), "--join-token", token),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # fmt: skip
    return AgentProcess(name=name, config=config, log=log, process=proc)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.delete()
        assert ns.name not in ip("netns", "list").stdout


def tcp_connects(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3):
        return True
    return False


@pytest.mark.needs_pods
def test_a_cluster_the_gateway_cannot_reach_is_served_through_the_agent(namespace, tmp_path):
    sandbox = start_sandbox_in(namespace, tmp_path / "sandbox")
    gateway = None
    agent: AgentProcess | None = None
    try:
        assert sandbox.url == f"https://127.0.0.1:{sandbox.port}"  # the namespace's loopback
        ssh_port = free_port()
        config = agent_gateway_config(sandbox, tmp_path / "gateway", ssh_port)
        config["plugins"]["agents"]["listen"] = f"{namespace.host_address}:{ssh_port}"
        (tmp_path / "gateway" / "upstream-token").unlink()  # gateway_config's file for a connection not kept
        gateway = start_gateway(tmp_path / "gateway", config)

        # The gateway knows neither the cluster's address nor a credential for it, and cannot reach it.
        text = gateway.config.read_text()
        for secret in (
            sandbox.url,
            f":{sandbox.port}",
            namespace.ns_address,
            sandbox.token,
            str(sandbox.ca_file),
        ):
            assert secret not in text
        assert not any(sandbox.token in p.read_text(errors="replace") for p in gateway.dir.rglob("*") if p.is_file()
                       and p.stat().st_size < 1024 * 1024)  # fmt: skip
        assert not tcp_connects("127.0.0.1", sandbox.port)
        assert not tcp_connects(namespace.ns_address, sandbox.port)
        namespace.run(
            sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {sandbox.port}), 3)"
        )

        joined = join_token(gateway.config, "edge-ns")
        agent = start_agent_in(namespace, tmp_path / "agent", sandbox, name="edge-ns",
                               gateways=[f"{namespace.host_address}:{ssh_port}"], host_key=joined["host_key"],
                               token=joined["token"])  # fmt: skip
        wait_ready(gateway, agent=agent)
        (record,) = agents_list(gateway.config)
        (tunnel,) = record["tunnels"]
        assert tunnel["peer"].startswith(f"{namespace.ns_address}:")  # it dialed out of the namespace

        kubeconfig = gateway.kubeconfig("alice", AGENT_CONNECTION)
        assert "web" in run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True).stdout
        done = run_kubectl(kubeconfig, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo in-ns")
        # Once in a CI run this exec ended with "websocket: close 1006"; keep both sides' logs if it recurs.
        assert done.returncode == 0 and done.stdout == "in-ns\n", (
            f"{done.stderr}\n--- gateway log ---\n{gateway.log.read_text()[-4000:]}"
            f"\n--- agent log ---\n{agent.log.read_text()[-4000:]}"
        )
        logged = wait_for_log(agent.log, "user=alice")
        assert re.search(
            r"edge GET /api/v1/namespaces/prod/pods\S* user=alice groups=developers -> 200", logged
        )
    finally:
        if agent is not None:
            agent.stop(kill=True)
        if gateway is not None:
            stop_process(gateway.process)
        stop_process(sandbox.process)


# -- two gateway replicas on one PostgreSQL, one agent ----------------------------------------------------


def test_one_agent_serves_two_replicas_sharing_a_database(sandbox, postgres, tmp_path):
    name = f"edge-{os.urandom(3).hex()}"  # the session's database is shared with other tests
    ssh_ports = [free_port(), free_port()]
    gateways = []
    agent: AgentProcess | None = None
    try:
        for index, ssh_port in enumerate(ssh_ports):
            directory = tmp_path / f"replica-{index}"
            config = agent_gateway_config(sandbox, directory, ssh_port, database_url=postgres.url)
            config["plugins"]["agents"]["replica"] = f"replica-{index}"
            gateways.append(start_gateway(directory, config))
        joined = join_token(gateways[0].config, name)
        # Both replicas present the host key kept in the database: one pinned fingerprint fits both.
        for gateway in gateways:
            (line,) = [
                line for line in gateway.log.read_text().splitlines() if "agent tunnels: listening" in line
            ]
            assert line.endswith(f"(host key {joined['host_key']})"), line

        agent = start_agent(tmp_path / "agent", sandbox, name=name, host_key=joined["host_key"],
                            gateways=[f"127.0.0.1:{port}" for port in ssh_ports], token=joined["token"])  # fmt: skip
        for gateway in gateways:
            wait_ready(gateway, agent=agent)
            kubeconfig = gateway.kubeconfig("alice", AGENT_CONNECTION)
            assert "web" in run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True).stdout

        (record,) = [a for a in agents_list(gateways[1].config) if a["name"] == name]
        assert sorted(t["replica"] for t in record["tunnels"]) == ["replica-0", "replica-1"], record
        assert record["state"] == "connected"

        # One replica goes: the other keeps serving, and the listing drops the gone replica's tunnel.
        stop_process(gateways[0].process)
        kubeconfig = gateways[1].kubeconfig("alice", AGENT_CONNECTION)
        for _ in range(3):
            assert "web" in run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True).stdout
        assert readiness(gateways[1])["connections"][AGENT_CONNECTION] == "ok"
        deadline = time.monotonic() + 15
        replicas: list[str] = []
        while time.monotonic() < deadline:
            (record,) = [a for a in agents_list(gateways[1].config) if a["name"] == name]
            replicas = [t["replica"] for t in record["tunnels"]]
            if replicas == ["replica-1"]:
                break
            time.sleep(0.5)
        assert replicas == ["replica-1"]
        assert agent.process.poll() is None
    finally:
        if agent is not None:
            agent.stop(kill=True)
        for gateway in gateways:
            if gateway.process.poll() is None:
                stop_process(gateway.process)
