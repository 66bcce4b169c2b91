"""Schema migrations (alembic) on SQLite and PostgreSQL: a new database is set up at start; the migrated
schema is exactly what the models say; a schema that is behind stops `kubegate serve` with the command to
run; `kubegate db upgrade` brings it up, also from a database made before migrations."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import SQLModel

from kubegate.core.db import Database, DatabaseError, _alembic_config, head_revision, import_models


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kubegate.db'}"
    return request.getfixturevalue("postgres").create_database(f"migrations_{abs(hash(tmp_path)) % 10**8}")


def at_revision(url: str, revision: str) -> None:
    database = Database(url)
    with database.engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)
    database.close()


def builtin_diffs(database: Database) -> list:
    import_models()
    with database.engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                 SQLModel.metadata)  # fmt: skip
    # Only tables of the built-in models count (a test may have imported others).
    return [d for d in diffs if "kubegate_" in repr(d)]


def test_a_new_database_is_set_up_at_start_and_matches_the_models(url):
    database = Database(url)
    assert database.schema_state() == "empty"
    database.create_tables()
    assert database.revision() == head_revision() and database.schema_state() == "current"
    assert builtin_diffs(database) == []  # the migrations and the models agree, column by column
    database.close()


def test_a_schema_behind_refuses_to_start_until_upgraded(url, tmp_path):
    at_revision(url, "0001")
    database = Database(url)
    with pytest.raises(DatabaseError, match=r"revision 0001, this kubegate needs .*kubegate db upgrade"):
        database.create_tables()
    config = tmp_path / "kubegate.yaml"
    (tmp_path / "token").write_text("t")
    upstream = {"server": "https://127.0.0.1:9", "insecure_skip_tls_verify": True, "token_file": "token"}
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "database": {"url": url},
                                      "connections": {"c": {"upstream": upstream}}}))  # fmt: skip
    cli = [sys.executable, "-m", "kubegate.core.cli"]
    status = subprocess.run([*cli, "db", "status", "--config", str(config)], capture_output=True, text=True)
    assert status.returncode == 1 and "revision: 0001" in status.stdout
    serve = subprocess.run([*cli, "serve", "--config", str(config), "--bind", "127.0.0.1:0"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert serve.returncode == 2 and "kubegate db upgrade" in serve.stderr and "Traceback" not in serve.stderr
    upgrade = subprocess.run([*cli, "db", "upgrade", "--config", str(config)], capture_output=True, text=True)
    assert upgrade.returncode == 0 and f"0001 -> {head_revision()}" in upgrade.stdout, upgrade.stderr
    assert Database(url).schema_state() == "current"
    again = subprocess.run([*cli, "db", "upgrade", "--config", str(config)], capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_database_made_before_migrations_is_adopted(url):
    at_revision(url, "0001")  # the tables as the previous kubegate made them, then no revision table
    database = Database(url)
    with database.engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    assert "no schema revision" in database.schema_state()
    assert database.upgrade() == (None, head_revision())
    assert database.schema_state() == "current" and builtin_diffs(database) == []
    database.close()


def test_approval_records_from_before_media_types_load_and_say_what_they_lack(url):
    """0006: the first-KiB `body_preview` becomes `body`, marked `body_truncated` where it may have been cut;
    `media_type` stays NULL (held before it was bound). Both kinds load; neither can be approved."""
    import asyncio

    from kubegate.core.flow import Identity
    from kubegate.plugins.approvals import store
    from kubegate.plugins.approvals.service import ApprovalService, ReviewError

    at_revision(url, "0005")
    database = Database(url)
    insert = text(
        "INSERT INTO kubegate_approvals (id, intent_hash, connection, rule, reason, requester, requester_person,"
        " requester_groups, requester_method, requester_claims, verb, resource, namespace, name, path,"
        " body_sha256, body_preview, command, kubectl_command, intent, reviewer_groups, min_approvals, scope,"
        " window_seconds, state, created_at, expires_at, approvals, version) VALUES (:id, 'h', 'c', 'r', '',"
        " 'alice', '', '[]', '', '{}', 'patch', 'deployments', 'prod', 'web', '/p', 'sha', :preview, '[]', '',"
        " '', '[\"sre\"]', 1, 'once', 0, 'pending', :now, :expires, '[]', 0)"
    )
    now = time.time()
    with database.engine.begin() as connection:
        for approval_id, preview in [("short", '{"spec":{}}'), ("cut", "x" * 1024)]:
            connection.execute(
                insert, {"id": approval_id, "preview": preview, "now": now, "expires": now + 600}
            )
    database.upgrade()
    records = {r.id: r for r in database.call(lambda s: store.list_approvals(s))}
    assert (records["short"].body, records["short"].body_truncated) == ('{"spec":{}}', False)
    assert (records["cut"].body, records["cut"].body_truncated) == ("x" * 1024, True)
    assert {r.media_type for r in records.values()} == {None}
    rita = Identity(user="rita", groups=("sre",), method="static-tokens", person="rita")
    for approval_id in records:
        with pytest.raises(ReviewError, match=r"can release no request|stored cut"):
            asyncio.run(ApprovalService(database, {}).review(approval_id, rita, True, ""))
    database.close()
