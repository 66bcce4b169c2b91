"""Schema migrations (alembic) on SQLite and PostgreSQL: a new database is set up at start; the migrated
schema is exactly what the models say; a schema that is behind stops `kubegate serve` with the command to
run; `kubegate db upgrade` brings it up, also from a database made before migrations."""

from __future__ import annotations

import subprocess
import sys

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
