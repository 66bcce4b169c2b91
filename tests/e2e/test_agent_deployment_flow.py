"""The enrolment flow deploy/kubernetes/agent relies on, end to end with real processes: an identity made
ahead of time with `kubegate agent keygen`, mounted read-only the way the kubelet lays out a Secret volume
(files are symlinks through `..data` into a timestamped directory, mode 0440), a join token read from
`join_token_file` at the first start, and a restart with the key alone once the token is removed from the
Secret — the pod restart of docs/agent.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import free_port, start_gateway, stop_process
from e2e.agent_stack import (
    agent_gateway_config,
    join_token,
    kubegate,
    start_agent,
    wait_ready,
)
from kubetest import run_kubectl

AGENT = "prod-eu-1"


def secret_volume(directory: Path, files: dict[str, bytes]) -> Path:
    """`files` laid out as the kubelet's atomic writer lays out a Secret volume (defaultMode 0440)."""
    data = directory / "..2026_12_06_00_00_00.000000001"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
        (data / name).chmod(0o440)
    (directory / "..data").symlink_to(data.name)
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")
    return directory


def test_a_key_made_ahead_in_a_read_only_secret_enrols_once_then_logs_in_alone(sandbox, tmp_path):
    ssh_port = free_port()
    config = agent_gateway_config(sandbox, tmp_path / "gateway", ssh_port)
    config["connections"][AGENT] = config["connections"].pop("edge")
    gateway = start_gateway(tmp_path / "gateway", config)
    agents = []
    try:
        made = tmp_path / "keygen"
        made.mkdir()
        printed = kubegate("agent", "keygen", "--identity-file", str(made / "id_ed25519")).stdout
        joined = join_token(gateway.config, AGENT, AGENT)
        identity = secret_volume(
            tmp_path / "identity",
            {"id_ed25519": (made / "id_ed25519").read_bytes(), "join-token": f"{joined['token']}\n".encode()},
        )
        shutil.rmtree(made)  # the Secret is now the key's only copy
        key_before = (identity / "id_ed25519").read_bytes()
        extra = {
            "identity_file": str(identity / "id_ed25519"),
            "join_token_file": str(identity / "join-token"),
            "log_format": "json",
        }
        start = dict(name=AGENT, gateways=[f"127.0.0.1:{ssh_port}"], host_key=joined["host_key"], token=None)

        # First start: enrols the key it was given (it cannot write one: the volume is read-only).
        agent = start_agent(tmp_path / "agent", sandbox, connections=(AGENT,), extra=extra, **start)
        agents.append(agent)
        wait_ready(gateway, AGENT, agent=agent)
        (record,) = json.loads(kubegate("agents", "list", "-c", str(gateway.config), "-o", "json").stdout)
        assert record["name"] == AGENT and record["fingerprint"] in printed
        kubeconfig = gateway.kubeconfig("alice", AGENT)
        run_kubectl(kubeconfig, "get", "namespaces", check=True)
        lines = [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]
        assert any(
            entry.get("message", "").startswith("{") and json.loads(entry["message"]).get("user") == "alice"
            for entry in lines
        ), agent.log.read_text()[-2000:]

        # The pod restarts after the token was removed from the Secret: the key alone logs in.
        agent.stop()
        wait_ready(gateway, AGENT, ready=False)
        (identity / "join-token").unlink()
        again = start_agent(tmp_path / "agent", sandbox, connections=(AGENT,), extra=extra, **start)
        agents.append(again)
        wait_ready(gateway, AGENT, agent=again)
        run_kubectl(kubeconfig, "get", "namespaces", check=True)
        assert (identity / "id_ed25519").read_bytes() == key_before

        # The spent token enrols nobody else.
        other = start_agent(
            tmp_path / "other", sandbox, connections=(AGENT,), extra={"log_format": "json"},
            **{**start, "name": "prod-eu-2", "token": joined["token"]},
        )  # fmt: skip
        agents.append(other)
        assert other.process.wait(60) != 0
        assert "join token" in other.log.read_text()
    finally:
        for process in agents:
            process.stop()
        stop_process(gateway.process)
