"""Who reads what through the gateway's JSON APIs (audit events, sessions, held requests, grants), driven in
process against a gateway with two connections, the records written straight into its stores.

Each connection answers for itself: a caller sees, of a connection that accepts their token, everything if
they are an auditor (or a reviewer) there and their own records otherwise, and nothing of a connection that
does not accept their token — whatever name or groups it gives them elsewhere.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubegate.core.gateway import Gateway
from kubegate.core.plugins import PluginHost
from kubegate.plugins.approvals import store as approvals
from kubegate.plugins.audit import store as audit
from kubegate.plugins.recording import store as recordings

try:
    from kubegate import testing
except ImportError:  # the kubegate.testing name is mapped in pyproject.toml; the module is core/testing
    from kubegate.core import testing

AUDITORS = "kubegate:auditors"
# Tokens. `ava` audits `dev` only, and `prod` does not know her token; `carol` audits `prod` and is a mere
# developer on `dev` (one token, both connections); `dev` and `prod` each have an `alice` of their own (two
# tokens: the same name at two identity sources is not the same person).
AVA, CAROL, ALICE_PROD, ALICE_DEV, BOB = (f"{name}-token-0123456789abcdef" for name in
                                          ("ava", "carol", "alice-prod", "alice-dev", "bob"))  # fmt: skip
TOKENS = {
    "prod": {
        "alice": (ALICE_PROD, ["developers"]),
        "bob": (BOB, ["developers"]),
        "carol": (CAROL, [AUDITORS]),
    },
    "dev": {"alice": (ALICE_DEV, ["developers"]), "ava": (AVA, [AUDITORS]), "carol": (CAROL, ["developers"])},
}


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("KUBEGATE_AUDIT_WRITER", "thread")  # the rows are written by this test
    (tmp_path / "upstream-token").write_text("gateway-credential")
    upstream = {
        "server": f"https://127.0.0.1:{testing.free_port()}",
        "token_file": str(tmp_path / "upstream-token"),
    }
    connections = {
        name: {"upstream": upstream, "plugins": {"static-tokens": testing.static_tokens(tokens), "audit-db": {},
                                                  "recording": {}, "approvals": {}}}
        for name, tokens in TOKENS.items()
    }  # fmt: skip
    config = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "connections": connections,
        "plugins": {
            "audit-db": {"readers": [AUDITORS]},
            "recording": {"storage": "database", "readers": [AUDITORS]},
        },
    }
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    served = Gateway.from_config(path, plugins=PluginHost(load_entry_points=False))
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def get(gateway: Gateway, path: str, token: str) -> tuple[int, Any]:
    response = await gateway.app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})
    body = await response.get_data(as_text=True)
    if response.mimetype == "application/jsonl":
        return response.status_code, [json.loads(line)["record"] for line in body.splitlines()]
    return response.status_code, json.loads(body)


def write_events(gateway: Gateway, *events: tuple[str, str]) -> None:
    """One `request` event per (connection, user), in this order, a second apart."""
    start = time.time() - 600
    records = [
        {"id": uuid.uuid4().hex, "time": start + index, "kind": "request", "connection": connection,
         "request_id": uuid.uuid4().hex, "data": {"identity": {"user": user, "groups": []},
                                                   "path": f"/api/v1/namespaces/{connection}/pods", "status": 200}}
        for index, (connection, user) in enumerate(events)
    ]  # fmt: skip
    audit.write(gateway.extensions["audit-db"].database, records, None)


def seen(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["connection"], e["data"]["identity"]["user"]) for e in items]


EVENTS = [
    ("prod", "alice"),
    ("prod", "bob"),
    ("prod", "carol"),
    ("dev", "alice"),
    ("dev", "ava"),
    ("dev", "carol"),
]


async def test_an_auditor_reads_every_event_of_the_connections_she_audits_and_none_of_the_others(gateway):
    write_events(gateway, *EVENTS)
    status, answer = await get(gateway, "/api/audit/events?since=1h", AVA)
    assert status == 200 and seen(answer["items"]) == [("dev", "alice"), ("dev", "ava"), ("dev", "carol")]
    assert (await get(gateway, "/api/audit/events?connection=prod", AVA))[0] == 403
    status, answer = await get(gateway, "/api/audit/events?user=alice", AVA)
    assert status == 200 and seen(answer["items"]) == [("dev", "alice")]  # not prod's alice
    status, lines = await get(gateway, "/api/audit/export", AVA)
    assert status == 200 and {e["connection"] for e in lines} == {"dev"}
    status, answer = await get(gateway, "/api/audit/commands", AVA)
    assert status == 200 and {(g["connection"], g["user"]) for g in answer["items"]} == set(EVENTS[3:])


async def test_an_auditor_of_one_connection_reads_only_her_own_events_on_another(gateway):
    write_events(gateway, *EVENTS)
    status, answer = await get(gateway, "/api/audit/events", CAROL)
    assert status == 200 and seen(answer["items"]) == [*EVENTS[:3], ("dev", "carol")]
    status, answer = await get(gateway, "/api/audit/events?connection=dev", CAROL)
    assert status == 200 and seen(answer["items"]) == [("dev", "carol")]
    status, answer = await get(gateway, "/api/audit/events?user=alice", CAROL)
    assert status == 200 and seen(answer["items"]) == [("prod", "alice")]
    status, answer = await get(gateway, "/api/audit/commands?connection=dev", CAROL)
    assert status == 200 and [(g["connection"], g["user"]) for g in answer["items"]] == [("dev", "carol")]
    assert (await get(gateway, "/api/audit/events?connection=dev&user=alice", CAROL))[0] == 403


async def test_a_caller_reads_their_own_events_only_where_their_token_is_accepted(gateway):
    write_events(gateway, *EVENTS)
    status, answer = await get(gateway, "/api/audit/events", ALICE_DEV)
    assert status == 200 and seen(answer["items"]) == [("dev", "alice")]  # prod's alice is someone else
    status, lines = await get(gateway, "/api/audit/export", ALICE_PROD)
    assert status == 200 and [(e["connection"], e["data"]["identity"]["user"]) for e in lines] == [
        ("prod", "alice")
    ]
    assert (await get(gateway, "/api/audit/events?user=bob", ALICE_PROD))[0] == 403
    assert (await get(gateway, "/api/audit/events?connection=prod", ALICE_DEV))[0] == 403


async def test_the_limit_counts_only_what_the_caller_may_read(gateway):
    # the caller's events are older than a page of everyone else's: narrowing after the query found none
    write_events(gateway, ("dev", "alice"), ("dev", "alice"), *[("dev", "ava"), ("prod", "alice")] * 5)
    status, answer = await get(gateway, "/api/audit/events?limit=2", ALICE_DEV)
    assert status == 200 and seen(answer["items"]) == [("dev", "alice")] * 2
    status, answer = await get(gateway, "/api/audit/events?limit=3", AVA)
    assert status == 200 and seen(answer["items"]) == [("dev", "ava")] * 3


def write_sessions(gateway: Gateway, *sessions: tuple[str, str]) -> None:
    """A recorded session per (connection, user), in this order, a second apart."""
    with gateway.database.session() as session:
        for index, (connection, user) in enumerate(sessions):
            session.add(recordings.SessionRecord(id=uuid.uuid4().hex, connection=connection, user=user,
                                                 started=time.time() - 600 + index))  # fmt: skip
        session.commit()


async def test_sessions_are_listed_per_connection_and_the_limit_counts_only_visible_ones(gateway):
    write_sessions(gateway, ("dev", "alice"), *[("dev", "ava"), ("prod", "alice")] * 3)
    status, answer = await get(gateway, "/api/sessions", AVA)
    assert status == 200 and {(s["connection"], s["user"]) for s in answer["items"]} == {
        ("dev", "alice"),
        ("dev", "ava"),
    }
    status, answer = await get(gateway, "/api/sessions?limit=1", ALICE_DEV)
    assert status == 200 and [(s["connection"], s["user"]) for s in answer["items"]] == [("dev", "alice")]
    status, answer = await get(gateway, "/api/sessions", CAROL)
    assert status == 200 and {(s["connection"], s["user"]) for s in answer["items"]} == {("prod", "alice")}
    prods = [s["id"] for s in (await get(gateway, "/api/sessions?connection=prod", CAROL))[1]["items"]]
    assert prods and (await get(gateway, f"/api/sessions/{prods[0]}", AVA))[0] == 401


async def test_held_requests_and_grants_are_shown_only_where_the_token_is_accepted(gateway):
    now = time.time()
    with gateway.database.session() as session:
        session.add(
            approvals.ApprovalRecord(
                id="held-in-prod",
                intent_hash="h",
                connection="prod",
                requester="bob",
                reviewer_groups=[AUDITORS],
                created_at=now,
                expires_at=now + 600,
            )
        )
        session.add(
            approvals.GrantRecord(
                id="grant-in-prod",
                approval_id="held-in-prod",
                connection="prod",
                user="alice",
                created_at=now,
                expires_at=now + 600,
            )
        )
        session.commit()  # fmt: skip
    status, answer = await get(gateway, "/api/approvals?state=all", CAROL)  # a reviewer on prod
    assert status == 200 and [a["id"] for a in answer["items"]] == ["held-in-prod"]
    status, answer = await get(gateway, "/api/approvals?state=all", AVA)  # in the group, on dev only
    assert status == 200 and answer["items"] == []
    assert (await get(gateway, "/api/approvals/held-in-prod", AVA))[0] == 401
    status, answer = await get(gateway, "/api/grants", ALICE_PROD)
    assert status == 200 and [g["id"] for g in answer["items"]] == ["grant-in-prod"]
    status, answer = await get(gateway, "/api/grants", ALICE_DEV)
    assert status == 200 and answer["items"] == []
