"""A gateway whose connection `edge` is served by a `kubegate agent` over its SSH tunnel: the gateway's
config holds no address and no credential for the sandbox; only the agent's does."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from conftest import GATEWAY_USERS, VENV_BIN, Gateway, Sandbox, free_port, gateway_config, start_gateway

AGENT_CONNECTION = "edge"


@dataclass
class AgentProcess:
    name: str
    config: Path
    log: Path
    process: subprocess.Popen

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def agent_gateway_config(sandbox: Sandbox, directory: Path, ssh_port: int, plugins: dict | None = None,
                         database_url: str | None = None) -> dict:  # fmt: skip
    """The usual test gateway config plus `edge`: a `type: agent` connection with the same plugins."""
    config = gateway_config(sandbox, directory, free_port())
    tokens = config["connections"]["sandbox"]["plugins"]
    config["connections"] = {
        AGENT_CONNECTION: {"type": "agent", "upstream": {}, "plugins": {**tokens, **(plugins or {})}}
    }
    config["plugins"] = {"agents": {"listen": f"127.0.0.1:{ssh_port}", "heartbeat_seconds": 1}}
    if database_url:
        config["database"] = {"url": database_url}
    return config


def kubegate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "kubegate"), *args], capture_output=True, text=True, timeout=60,
                          check=check)  # fmt: skip


def join_token(config: Path, name: str, *connections: str) -> dict[str, Any]:
    args = ["agents", "join-token", "-c", str(config), "--name", name, "-o", "json"]
    for connection in connections or (AGENT_CONNECTION,):
        args += ["--connection", connection]
    return json.loads(kubegate(*args).stdout)


def start_agent(directory: Path, sandbox: Sandbox, *, name: str, gateways: list[str], host_key: str,
                token: str | None, connections: tuple[str, ...] = (AGENT_CONNECTION,),
                extra: dict | None = None) -> AgentProcess:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster-token").write_text(sandbox.token)
    cluster = {"server": sandbox.url, "certificate_authority": str(sandbox.ca_file),
               "token_file": str(directory / "cluster-token")}  # fmt: skip
    config = {
        "name": name,
        "gateways": gateways,
        "gateway_host_key": host_key,
        "identity_file": str(directory / "id_ed25519"),
        "connections": {c: cluster for c in connections},
        "audit_log": str(directory / "agent-audit.jsonl"),
        "max_backoff_seconds": 2,
        **(extra or {}),
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "agent.log"
    args = [str(VENV_BIN / "kubegate"), "agent", "--config", str(path)]
    if token:
        args += ["--join-token", token]
    proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    return AgentProcess(name=name, config=path, log=log, process=proc)


def readiness(gateway: Gateway) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    try:
        with urllib.request.urlopen(f"{gateway.url}/readyz", context=ctx, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def wait_ready(gateway: Gateway, connection: str = AGENT_CONNECTION, *, ready: bool = True,
               timeout: float = 30, agent: AgentProcess | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    state: Any = None
    while time.monotonic() < deadline:
        state = readiness(gateway).get("connections", {}).get(connection)
        if (state == "ok") == ready:
            return
        if agent is not None and agent.process.poll() is not None:
            raise RuntimeError(f"agent exited ({agent.process.returncode}): {agent.log.read_text()}")
        time.sleep(0.2)
    detail = agent.log.read_text()[-3000:] if agent else ""
    raise AssertionError(f"connection {connection} readiness stayed {state!r}\n{detail}")


@dataclass
class AgentStack:
    sandbox: Sandbox
    gateway: Gateway
    agent: AgentProcess
    ssh_port: int
    host_key: str
    directory: Path

    def kubeconfig(self, user: str = "alice") -> Path:
        return self.gateway.kubeconfig(user, AGENT_CONNECTION)


def start_agent_stack(sandbox: Sandbox, directory: Path, plugins: dict | None = None) -> AgentStack:
    ssh_port = free_port()
    config = agent_gateway_config(sandbox, directory / "gateway", ssh_port, plugins)
    gateway = start_gateway(directory / "gateway", config)
    joined = join_token(gateway.config, "edge-1")
    agent = start_agent(directory / "agent", sandbox, name="edge-1", gateways=[f"127.0.0.1:{ssh_port}"],
                        host_key=joined["host_key"], token=joined["token"])  # fmt: skip
    wait_ready(gateway, agent=agent)
    return AgentStack(sandbox, gateway, agent, ssh_port, joined["host_key"], directory)


__all__ = ["GATEWAY_USERS", "sys"]


# -- helpers of the fault and topology tests ---------------------------------------------------------------


def gateway_get(gateway: Gateway, connection: str, path: str, user: str = "alice") -> tuple[int, Any]:
    """A GET through the gateway as `user`: (status, the JSON body, or the text when it is not JSON)."""
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    request = urllib.request.Request(f"{gateway.connection_url(connection)}{path}",
                                     headers={"Authorization": f"Bearer {GATEWAY_USERS[user][1]}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def wait_for_log(path: Path, text: str, timeout: float = 30) -> str:
    """The log once it contains `text`; AssertionError with the log's tail when it does not in time."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} within {timeout:g} s; tail:\n{content[-3000:]}")


def agents_list(config: Path) -> list[dict[str, Any]]:
    """`kubegate agents list -o json`: every enrolled agent with its tunnels (one per gateway replica)."""
    return json.loads(kubegate("agents", "list", "-c", str(config), "-o", "json").stdout)


def stop_stack(stack: AgentStack) -> None:
    """Stop the agent, then the gateway (each test of a fault has its own stack)."""
    from conftest import stop_process

    stack.agent.stop(kill=True)
    if stack.gateway.process.poll() is None:
        stop_process(stack.gateway.process)


def write_agent_config(directory: Path, sandbox: Sandbox, *, name: str, gateways: list[str], host_key: str,
                       connections: tuple[str, ...] = (AGENT_CONNECTION,), extra: dict | None = None) -> Path:  # fmt: skip
    """The agent.yaml `start_agent` writes, for an agent started some other way (e.g. in a network namespace)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster-token").write_text(sandbox.token)
    cluster = {"server": sandbox.url, "certificate_authority": str(sandbox.ca_file),
               "token_file": str(directory / "cluster-token")}  # fmt: skip
    config = {"name": name, "gateways": gateways, "gateway_host_key": host_key,
              "identity_file": str(directory / "id_ed25519"), "connections": {c: cluster for c in connections},
              "audit_log": str(directory / "agent-audit.jsonl"), "max_backoff_seconds": 2, **(extra or {})}  # fmt: skip
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
