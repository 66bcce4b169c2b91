"""The database layer on a real PostgreSQL server (Debian's, started by the `postgres` fixture): the same
store functions the gateway uses on SQLite."""

from __future__ import annotations

import time

from kubegate.core.db import Database
from kubegate.plugins.approvals import store as approvals
from kubegate.plugins.login import store as login


def test_tokens_assertions_and_approvals_on_postgres(postgres):
    db = Database(postgres.create_database("store_test"))
    db.create_tables()
    _, record = db.call(lambda s: login.mint_token(s, {"user": "u", "groups": ["g"], "claims": {"a": 1}},
                                                       ttl_seconds=60, connection=None, description=""))  # fmt: skip
    found = db.call(lambda s: login.find_token(s, record.token_hash))
    assert found is not None and found.groups == ["g"] and found.claims == {"a": 1}
    assert db.call(lambda s: login.remember_assertion(s, "_a", "idp", time.time() + 60)) is True
    assert db.call(lambda s: login.remember_assertion(s, "_a", "idp", time.time() + 60)) is False

    now = time.time()
    request = approvals.ApprovalRecord(id="r1", intent_hash="h", connection="c", requester="alice",
                                       created_at=now, expires_at=now + 60, approvals=[])  # fmt: skip
    db.call(lambda s: approvals.add(s, request))
    stale = db.call(lambda s: approvals.get(s, "r1"))
    assert db.call(lambda s: approvals.change(s, stale, approvals=[{"reviewer": "rita"}])) is True
    # A second writer holding the same (now stale) version loses: no approval is silently overwritten.
    assert db.call(lambda s: approvals.change(s, stale, approvals=[{"reviewer": "ray"}])) is False
    assert db.call(lambda s: approvals.get(s, "r1")).approvals == [{"reviewer": "rita"}]
    assert db.call(lambda s: approvals.find_open(s, "h")).id == "r1"
    db.close()
