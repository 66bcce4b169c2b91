"""The agent tunnel's database store: join tokens are single use (also when two replicas redeem one at once),
expire, and bind a preset name; a revoked agent may enrol again; replicas share one SSH host key; `list_agents`
counts only tunnels heard from recently."""

from __future__ import annotations

import threading

import pytest

from kubegate.connections.agent import keys, store
from kubegate.connections.agent.store import EnrolmentError
from kubegate.core.db import Database

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPwG4wvYl8DOr1PFhQuOq4sEgO4NRgDm+zv1yB2PAXgk agent@host"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0pSQq3p4s1yTgq8cM0wQfR2WOxXq8+6Dr0i2GZ2Q9d"


@pytest.fixture
def database(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_database(request, tmp_path):
    """SQLite, then PostgreSQL (where replicas really redeem at the same time)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kubegate.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"agents_{abs(hash(tmp_path)) % 10**8}")
    database = Database(url)
    yield database
    database.close()


def mint(
    database: Database, *connections: str, ttl: float = 3600, name: str = "", now: float = 1000.0
) -> str:
    token, _ = database.call(
        lambda s: store.mint_join_token(s, list(connections), ttl_seconds=ttl, agent_name=name, now=now)
    )
    return token


def redeem(
    database: Database, token: str, name: str, key: str = KEY, now: float = 1010.0
) -> store.AgentRecord:
    return database.call(
        lambda s: store.redeem_join_token(
            s, token, agent_name=name, public_key=key, fingerprint="SHA256:x", now=now
        )
    )


def test_a_join_token_enrols_one_agent_once(database):
    token = mint(database, "prod", "staging")
    assert token.startswith("kgj_") and store.JOIN_TOKEN_SHAPE.match(token)
    stored = database.call(lambda s: s.get(store.JoinTokenRecord, token.split("_")[1]))
    assert stored.token_hash == store.join_token_hash(token) and token not in repr(stored)
    agent = redeem(database, token, "edge-1")
    assert agent.name == "edge-1" and agent.connections == ["prod", "staging"] and agent.public_key == KEY
    assert agent.token_id == stored.id and agent.revoked_at is None
    with pytest.raises(EnrolmentError, match=r"^the join token is unknown, expired or already used$"):
        redeem(database, token, "edge-2", OTHER_KEY)
    spent = database.call(lambda s: s.get(store.JoinTokenRecord, stored.id))
    assert spent.used_at == 1010.0 and spent.used_by == "edge-1"
    assert database.call(lambda s: store.find_agent(s, "edge-2")) is None


@pytest.mark.parametrize(
    "token", ["", "kgj_nothing", "kgt_0123456789ab_" + "A" * 43, "kgj_0123456789ab_" + "A" * 43]
)
def test_malformed_and_unknown_tokens_get_the_same_refusal(database, token):
    with pytest.raises(EnrolmentError, match=r"^the join token is unknown, expired or already used$"):
        redeem(database, token, "edge-1")


def test_an_expired_token_is_refused_and_stays_unused(database):
    token = mint(database, "prod", ttl=60, now=1000.0)
    with pytest.raises(EnrolmentError, match="unknown, expired or already used"):
        redeem(database, token, "edge-1", now=1060.0)
    assert redeem(database, token, "edge-1", now=1059.0).name == "edge-1"  # just in time


def test_a_preset_name_is_enforced_and_a_refused_name_leaves_the_token_usable(database):
    token = mint(database, "prod", name="edge-1")
    with pytest.raises(EnrolmentError, match="this join token is for agent 'edge-1', not 'edge-2'"):
        redeem(database, token, "edge-2")
    assert redeem(database, token, "").name == "edge-1"  # no name: the preset one


@pytest.mark.parametrize("name", ["Edge", "-edge", "edge-", "a" * 64, "edge_1", "sys tem"])
def test_names_must_be_dns_style_and_a_bad_one_does_not_spend_the_token(database, name):
    token = mint(database, "prod")
    with pytest.raises(EnrolmentError, match="must be lower-case letters"):
        redeem(database, token, name)
    with pytest.raises(EnrolmentError, match="OpenSSH 'ssh-ed25519"):
        redeem(database, token, "edge-1", key="ssh-rsa AAAAB3Nza")
    assert redeem(database, token, "edge-1").name == "edge-1"


def test_an_enrolled_name_is_refused_until_revoked_then_re_enrolled_with_the_new_key(database):
    redeem(database, mint(database, "prod"), "edge-1")
    second = mint(database, "staging")
    with pytest.raises(
        EnrolmentError, match=r"^agent edge-1 is already enrolled; revoke it first or choose another"
    ):
        redeem(database, second, "edge-1", OTHER_KEY)
    assert database.call(lambda s: store.revoke_agent(s, "edge-1", by="admin", now=1020.0))
    assert not database.call(lambda s: store.revoke_agent(s, "edge-1", by="admin"))  # already
    assert not database.call(lambda s: store.revoke_agent(s, "nobody"))
    revoked = database.call(lambda s: store.find_agent(s, "edge-1"))
    assert revoked.revoked_at == 1020.0 and revoked.revoked_by == "admin"
    again = redeem(database, second, "edge-1", OTHER_KEY, now=1030.0)  # the refused token was not spent
    assert again.public_key == OTHER_KEY and again.revoked_at is None and again.revoked_by == ""
    assert again.connections == ["staging"] and again.enrolled_at == 1030.0


def test_one_token_redeemed_by_two_threads_at_once_enrols_exactly_one(any_database):
    database = any_database
    for round_ in range(5):
        token = mint(database, "prod")
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def attempt(name: str, token: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            try:
                outcomes.append(redeem(database, token, name).name)
            except EnrolmentError as exc:
                outcomes.append(str(exc))

        threads = [
            threading.Thread(target=attempt, args=(f"r{round_}-{i}", token, barrier, outcomes))
            for i in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [o for o in outcomes if o.startswith(f"r{round_}-")]
        assert len(winners) == 1, outcomes
        assert outcomes.count(store.UNUSABLE_TOKEN) == 1
        enrolled = {a["name"] for a in database.call(lambda s: store.list_agents(s))}
        assert enrolled & {f"r{round_}-0", f"r{round_}-1"} == set(winners)


def test_replicas_share_one_generated_host_key(database, tmp_path):
    generated: list[str] = []

    def generate() -> str:
        generated.append(keys.generate_private_key())
        return generated[-1]

    first = database.call(lambda s: store.load_or_create_host_key(s, generate))
    second = database.call(lambda s: store.load_or_create_host_key(s, generate))
    assert first == second and len(generated) == 1 and first.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    other_replica = Database(database.url)
    key = keys.gateway_host_key(None, tmp_path, other_replica)
    assert keys.fingerprint(key) == keys.fingerprint(keys.gateway_host_key(None, tmp_path, database))
    assert keys.fingerprint(key).startswith("SHA256:")
    other_replica.close()


def test_a_replica_that_loses_the_host_key_race_reads_the_winners(database):
    winner = keys.generate_private_key()

    def generate_while_another_replica_wins() -> str:
        database.call(lambda s: s.add(store.HostKeyRecord(id=store.HOST_KEY_ID, private_key=winner)))
        return keys.generate_private_key()

    assert (
        database.call(lambda s: store.load_or_create_host_key(s, generate_while_another_replica_wins))
        == winner
    )


def test_a_configured_host_key_file_is_used_and_a_bad_one_named(database, tmp_path):
    from kubegate.connections.agent.settings import AgentGatewaySettings

    (tmp_path / "host_key").write_text(keys.generate_private_key())
    key = keys.gateway_host_key(AgentGatewaySettings(host_key_file="host_key"), tmp_path, database)
    assert keys.public_key_line(key).startswith("ssh-ed25519 ")
    (tmp_path / "garbage").write_text("not a key")
    with pytest.raises(keys.HostKeyError, match="garbage is not an unencrypted"):
        keys.gateway_host_key(AgentGatewaySettings(host_key_file="garbage"), tmp_path, database)
    with pytest.raises(keys.HostKeyError, match=r"cannot read the SSH host key .*missing"):
        keys.gateway_host_key(AgentGatewaySettings(host_key_file="missing"), tmp_path, database)


def test_list_agents_counts_only_tunnels_heard_from_recently(database):
    redeem(database, mint(database, "prod"), "edge-1", now=1000.0)
    redeem(database, mint(database, "prod"), "edge-2", OTHER_KEY, now=1000.0)
    fresh = database.call(lambda s: store.open_session(s, agent="edge-1", replica="gw-a", peer="10.0.0.5:4022",
                                                       version="0.2.0", connections=["prod"], now=1000.0))  # fmt: skip
    database.call(lambda s: store.open_session(s, agent="edge-1", replica="gw-b", peer="10.0.0.5:4023",
                                                       version="0.2.0", connections=["prod"], now=1000.0))  # fmt: skip
    closed = database.call(lambda s: store.open_session(s, agent="edge-2", replica="gw-a", peer="10.0.0.6:4022",
                                                        version="0.1.9", connections=["prod"], now=1000.0))  # fmt: skip
    database.call(lambda s: store.touch_sessions(s, [fresh, closed], now=1100.0))
    database.call(lambda s: store.close_session(s, closed, now=1101.0))
    database.call(lambda s: store.close_session(s, closed, now=1200.0))  # the first end stays
    database.call(lambda s: store.touch_sessions(s, [closed], now=1300.0))  # an ended tunnel is not revived
    listed = {
        a["name"]: a for a in database.call(lambda s: store.list_agents(s, stale_after=30.0, now=1110.0))
    }
    assert [t["replica"] for t in listed["edge-1"]["tunnels"]] == ["gw-a"]  # gw-b stopped heartbeating
    assert listed["edge-1"]["tunnels"][0] == {"replica": "gw-a", "peer": "10.0.0.5:4022", "version": "0.2.0",
                                              "connections": ["prod"], "connected_at": 1000.0, "last_seen": 1100.0}  # fmt: skip
    assert listed["edge-1"]["last_seen"] == 1100.0 and listed["edge-1"]["fingerprint"] == "SHA256:x"
    assert listed["edge-2"]["tunnels"] == [] and listed["edge-2"]["last_seen"] == 1101.0
    assert listed["edge-2"]["version"] == "0.1.9"
    database.call(lambda s: store.revoke_agent(s, "edge-2", now=1120.0))
    assert [a["name"] for a in database.call(lambda s: store.list_agents(s, now=1130.0))] == ["edge-1"]
    everyone = database.call(lambda s: store.list_agents(s, include_revoked=True, now=1130.0))
    assert [(a["name"], a["revoked_at"]) for a in everyone] == [("edge-1", None), ("edge-2", 1120.0)]


def test_old_ended_tunnels_are_dropped_when_the_agent_connects_again(database):
    old = database.call(lambda s: store.open_session(s, agent="edge-1", replica="gw-a", peer="", version="",
                                                     connections=[], now=1000.0))  # fmt: skip
    database.call(lambda s: store.close_session(s, old, now=1010.0))
    later = 1010.0 + store.SESSION_RETENTION_SECONDS + 1
    new = database.call(lambda s: store.open_session(s, agent="edge-1", replica="gw-a", peer="", version="",
                                                     connections=[], now=later))  # fmt: skip
    assert database.call(lambda s: s.get(store.AgentSessionRecord, old)) is None
    assert database.call(lambda s: s.get(store.AgentSessionRecord, new)) is not None


def test_mint_refuses_what_could_never_enrol(database):
    with pytest.raises(ValueError, match="at least one connection"):
        database.call(lambda s: store.mint_join_token(s, [], ttl_seconds=60))
    with pytest.raises(ValueError, match="agent name 'Bad Name'"):
        database.call(lambda s: store.mint_join_token(s, ["prod"], ttl_seconds=60, agent_name="Bad Name"))


def test_join_token_usable_answers_without_spending_the_token(database):
    token = mint(database, "prod", ttl=60, now=1000.0)
    assert database.call(lambda s: store.join_token_usable(s, token, now=1010.0))
    assert not database.call(lambda s: store.join_token_usable(s, token, now=1060.0))  # expired
    assert not database.call(lambda s: store.join_token_usable(s, "kgj_nothing", now=1010.0))
    redeem(database, token, "edge-1", now=1010.0)  # still unspent after the check
    assert not database.call(lambda s: store.join_token_usable(s, token, now=1011.0))
