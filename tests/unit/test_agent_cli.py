"""`kubegate agents join-token|list|revoke` against a config with a `type: agent` connection: the token is
printed once with the gateway's host-key fingerprint and a usable agent.yaml; `list` shows each agent's state
and tunnels; `revoke` ends an identity; every bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubegate.connections.agent import keys, store
from kubegate.core.cli import main
from kubegate.core.db import Database

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPwG4wvYl8DOr1PFhQuOq4sEgO4NRgDm+zv1yB2PAXgk"


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "kubegate.yaml"
    (tmp_path / "token").write_text("t")
    path.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:8443",
                "state_dir": "state",
                "plugins": {"agents": {"heartbeat_seconds": 5}},
                "connections": {
                    "prod": {"type": "agent", "upstream": {}},
                    "edge": {"type": "agent", "upstream": {"agents": ["edge-1"]}},
                    "direct": {"upstream": {"server": "https://127.0.0.1:9", "token_file": "token"}},
                },
            }
        )
    )
    return path


def database(config: Path) -> Database:
    return Database(f"sqlite:///{config.parent / 'state' / 'kubegate.db'}")


def enrol(db: Database, name: str) -> None:
    token, _ = db.call(lambda s: store.mint_join_token(s, ["prod"], ttl_seconds=60))
    db.call(
        lambda s: store.redeem_join_token(s, token, agent_name=name, public_key=KEY, fingerprint="SHA256:k")
    )


def tunnel(db: Database, agent: str, replica: str, version: str, at: float) -> str:
    return db.call(lambda s: store.open_session(s, agent=agent, replica=replica, peer="10.0.0.5:40000",
                                                version=version, connections=["prod"], now=at))  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_join_token_prints_the_token_fingerprint_and_an_agent_yaml(config, capsys):
    code, out, _ = run(capsys, "agents", "join-token", "-c", str(config), "--connection", "prod",
                       "--connection", "edge", "--name", "edge-1", "--ttl", "30m")  # fmt: skip
    assert code == 0
    token = re.search(r"kgj_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", out).group(0)
    assert out.count(token) == 2  # the token, and the command to run with it
    assert f"kubegate agent --config agent.yaml --join-token {token}" in out
    host_key = keys.fingerprint(keys.gateway_host_key(None, config.parent, database(config)))
    assert f"Gateway SSH host key: {host_key}" in out
    snippet = out.split("# agent.yaml", 1)[1].split("\n\n", 1)[0]
    agent_yaml = yaml.safe_load(snippet.split("\n", 1)[1])
    assert agent_yaml == {
        "name": "edge-1",
        "gateways": ["127.0.0.1:8022"],
        "gateway_host_key": host_key,
        "identity_file": "/var/lib/kubegate-agent/id_ed25519",
        "connections": {"prod": {"in_cluster": True}, "edge": {"in_cluster": True}},
    }
    record = database(config).call(lambda s: s.get(store.JoinTokenRecord, token.split("_")[1]))
    assert record.connections == ["prod", "edge"] and record.agent_name == "edge-1"
    assert record.expires_at - record.created_at == 1800 and record.created_by.startswith("admin (")


def test_join_token_json_is_for_scripts_and_the_token_enrols(config, capsys):
    code, out, _ = run(
        capsys, "agents", "join-token", "-c", str(config), "--connection", "prod", "-o", "json"
    )
    assert code == 0
    printed = json.loads(out)
    assert (
        printed["connections"] == ["prod"]
        and printed["name"] == ""
        and printed["gateways"] == ["127.0.0.1:8022"]
    )
    assert printed["host_key"].startswith("SHA256:") and printed["expires_at"].endswith("Z")
    agent = database(config).call(
        lambda s: store.redeem_join_token(
            s, printed["token"], agent_name="dc-7", public_key=KEY, fingerprint="SHA256:k"
        )
    )
    assert agent.connections == ["prod"]


def test_a_configured_listener_and_host_key_file_are_what_is_printed(config, capsys):
    (config.parent / "host_key").write_text(keys.generate_private_key())
    settings = yaml.safe_load(config.read_text())
    settings["plugins"]["agents"] = {"listen": "agents.example.com:2222", "host_key_file": "host_key"}
    config.write_text(yaml.safe_dump(settings))
    code, out, _ = run(
        capsys, "agents", "join-token", "-c", str(config), "--connection", "prod", "-o", "json"
    )
    from kubegate.connections.agent.settings import AgentGatewaySettings

    expected = keys.gateway_host_key(
        AgentGatewaySettings(host_key_file="host_key"), config.parent, database(config)
    )
    assert code == 0 and json.loads(out)["host_key"] == keys.fingerprint(expected)
    assert json.loads(out)["gateways"] == ["agents.example.com:2222"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connection", "nope"], "no connection 'nope' in"),
        (["--connection", "direct"], "connection 'direct' is `type: kubernetes`, not `type: agent`"),
        (["--connection", "prod", "--ttl", "8d"], "at most 7d"),
        (["--connection", "prod", "--ttl", "soon"], "give a duration such as 30m"),
        (["--connection", "prod", "--name", "Not_A_Name"], "--name 'Not_A_Name'"),
    ],
)
def test_join_token_refuses_bad_input_in_one_line(config, capsys, args, message):
    code, out, err = run(capsys, "agents", "join-token", "-c", str(config), *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_bad_agents_block_is_named(config, capsys):
    settings = yaml.safe_load(config.read_text())
    settings["plugins"]["agents"] = {"heartbeat_seconds": 0}
    config.write_text(yaml.safe_dump(settings))
    code, _, err = run(capsys, "agents", "list", "-c", str(config))
    assert code == 2 and "plugins.agents.heartbeat_seconds" in err and len(err.strip().splitlines()) == 1


def test_list_shows_connected_disconnected_and_revoked_agents(config, capsys):
    import time

    db = database(config)
    now = time.time()
    for name in ("edge-1", "edge-2", "edge-3"):
        enrol(db, name)
    open_ = [tunnel(db, "edge-1", replica, "0.3.0", now - 125) for replica in ("gw-a", "gw-b")]
    db.call(lambda s: store.touch_sessions(s, open_, now=now - 2))
    gone = tunnel(db, "edge-2", "gw-a", "0.2.9", now - 400)
    db.call(lambda s: store.close_session(s, gone, now=now - 300))
    db.call(lambda s: store.revoke_agent(s, "edge-3", by="admin"))

    code, out, _ = run(capsys, "agents", "list", "-c", str(config))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "STATE", "CONNECTIONS", "TUNNELS", "VERSION", "SINCE", "LAST",
                                             "HEARTBEAT"]  # fmt: skip
    assert len(lines) == 3  # revoked agents only with --all
    assert lines[1].split()[:7] == ["edge-1", "connected", "prod", "gw-a,gw-b", "0.3.0", "2m", "ago"]
    assert re.fullmatch(r"\ds ago", lines[1].split(maxsplit=7)[7])
    assert lines[2].split() == ["edge-2", "disconnected", "prod", "-", "0.2.9", "5m", "ago", "5m", "ago"]

    code, out, _ = run(capsys, "agents", "list", "-c", str(config), "--all", "-o", "json")
    listed = {a["name"]: a for a in json.loads(out)}
    assert code == 0 and [listed[n]["state"] for n in ("edge-1", "edge-2", "edge-3")] == [
        "connected",
        "disconnected",
        "revoked",
    ]
    assert [t["replica"] for t in listed["edge-1"]["tunnels"]] == ["gw-a", "gw-b"]


def test_list_counts_a_tunnel_gone_after_three_missed_heartbeats(config, capsys):
    import time

    db = database(config)
    enrol(db, "edge-1")
    tunnel(db, "edge-1", "gw-a", "0.3.0", time.time() - 16)
    code, out, _ = run(capsys, "agents", "list", "-c", str(config))  # heartbeat_seconds 5: stale after 15 s
    assert code == 0 and out.splitlines()[1].split()[:4] == ["edge-1", "disconnected", "prod", "-"]


def test_revoke_ends_an_identity_once(config, capsys):
    db = database(config)
    enrol(db, "edge-1")
    code, out, _ = run(capsys, "agents", "revoke", "-c", str(config), "edge-1")
    assert code == 0 and "revoked agent edge-1 (key SHA256:k)" in out and "within one heartbeat (5s)" in out
    assert db.call(lambda s: store.find_agent(s, "edge-1")).revoked_by.startswith("admin (")
    code, _, err = run(capsys, "agents", "revoke", "-c", str(config), "edge-1")
    assert code == 2 and err.strip() == "kubegate: error: agent 'edge-1' is already revoked"
    code, _, err = run(capsys, "agents", "revoke", "-c", str(config), "nobody")
    assert code == 2 and err.strip() == "kubegate: error: no agent 'nobody'"
