"""The audit hash chain in a real database (SQLite and PostgreSQL): `verify` names the first modified,
deleted, inserted or reordered record, a cut tail, a changed search column and a forged signature."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import text

from kubegate.core.db import Database
from kubegate.plugins.audit import chain, store
from kubegate.plugins.audit.file import AuditFileSettings, FileSink, stored_from_files

KEY = b"an hmac key of at least sixteen bytes"


def records(count: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"e{i}", "time": 1000.0 + i, "kind": "request", "connection": "prod", "request_id": f"r{i}",
         "data": {"identity": {"user": "alice" if i % 2 else "ci-bot", "groups": ["developers"]},
                  "attributes": {"verb": "get", "resource": "pods", "namespace": "prod", "name": f"p{i}"},
                  "status": 200, "kubectl_command": "get pods", "kubectl_session": "s1"}}
        for i in range(start, start + count)
    ]  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    else:
        server = request.getfixturevalue("postgres")
        db = Database(server.create_database(f"audit_{abs(hash(tmp_path)) % 10**8}"))
    db.create_tables()
    yield db
    db.close()


def filled(db: Database, signer: chain.Signer | None = None) -> Database:
    db.call(lambda s: store.append(s, records(3), signer))
    db.call(lambda s: store.append(s, records(3, start=3), signer))  # a second batch continues the chain
    return db


def problem(db: Database, signer: chain.Signer | None = None) -> chain.Problem | None:
    return db.call(lambda s: store.verify(s, signer))[1]


def sql(db: Database, statement: str, **params: object) -> None:
    with db.engine.begin() as connection:
        connection.execute(text(statement), params)


def test_an_untouched_chain_is_intact(database):
    filled(database)
    checked, found = database.call(lambda s: store.verify(s))
    assert (checked, found) == (6, None)
    assert database.call(store.head)[0] == 6


def test_an_edited_record_is_found(database):
    filled(database)
    row = database.call(lambda s: s.get(store.AuditRow, 4))
    edited = row.record.replace('"status":200', '"status":404')
    sql(database, "UPDATE kubegate_audit_events SET record = :record WHERE seq = 4", record=edited)
    found = problem(database)
    assert (found.seq, found.what) == (4, "modified")


def test_an_edited_search_column_is_found(database):
    filled(database)
    sql(database, "UPDATE kubegate_audit_events SET \"user\" = 'nobody' WHERE seq = 2")
    found = problem(database)
    assert (found.seq, found.what) == (2, "modified") and "user" in found.detail


def test_a_deleted_record_is_found(database):
    filled(database)
    sql(database, "DELETE FROM kubegate_audit_events WHERE seq = 3")
    found = problem(database)
    assert (found.seq, found.what) == (3, "deleted")


def test_a_reordered_pair_is_found(database):
    filled(database)
    sql(database, "UPDATE kubegate_audit_events SET seq = -1 WHERE seq = 2")
    sql(database, "UPDATE kubegate_audit_events SET seq = 2 WHERE seq = 3")
    sql(database, "UPDATE kubegate_audit_events SET seq = 3 WHERE seq = -1")
    found = problem(database)
    assert (found.seq, found.what) == (2, "reordered")


def test_an_inserted_record_is_found_even_when_rechained_without_the_key(database):
    signer = chain.Signer("hmac-sha256", KEY)
    filled(database, signer)
    # An insider re-chains the whole table after slipping a record in at 3: hashes all agree again...
    rows = database.call(lambda s: [json.loads(r.record) for r in s.exec(store.select(store.AuditRow)).all()])
    sql(database, "DELETE FROM kubegate_audit_events")
    sql(database, "DELETE FROM kubegate_audit_head")
    forged = [*rows[:2], {**rows[0], "id": "forged", "data": {"note": "nothing happened"}}, *rows[2:]]
    database.call(lambda s: store.append(s, [{k: v for k, v in r.items() if k != "seq"} for r in forged],
                                         chain.Signer("hmac-sha256", b"the insider's own key, 32 bytes")))  # fmt: skip
    assert problem(database) is None  # ...so without the key it looks intact;
    found = problem(database, signer)  # the signatures give it away
    assert (found.seq, found.what) == (1, "unsigned")


def test_records_cut_from_the_end_are_found(database):
    filled(database)
    sql(database, "DELETE FROM kubegate_audit_events WHERE seq >= 5")
    found = problem(database)
    assert (found.seq, found.what) == (5, "truncated")


def test_ed25519_signatures_verify_with_the_public_key_only(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.create_tables()
    filled(db, chain.Signer("ed25519", private))
    verifier = chain.Signer("ed25519", public)
    assert not verifier.can_sign
    assert problem(db, verifier) is None
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert problem(db, chain.Signer("ed25519", other)).what == "unsigned"


def test_file_sink_chain_continues_across_rotation_and_restart(tmp_path):
    path = tmp_path / "audit.jsonl"
    settings = AuditFileSettings(path=path, max_bytes=1024, keep=50)
    sink = FileSink(settings, path, None)
    for start in range(0, 12, 3):
        sink.write(records(3, start))
    again = FileSink(settings, path, None)  # a restart resumes the chain from the last line
    again.write(records(2, 12))
    files = [*sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:])), path]
    assert len(files) > 2  # it rotated
    checked, found = chain.verify(stored_from_files(files), trust_first=True)
    assert (checked, found) == (14, None)
    # one line of a middle file edited
    middle = files[1]
    lines = middle.read_text().splitlines()
    lines[0] = lines[0].replace('"status":200', '"status":500')
    middle.write_text("\n".join(lines) + "\n")
    found = chain.verify(stored_from_files(files), trust_first=True)[1]
    assert found is not None and found.what == "modified"
    cli = subprocess.run([sys.executable, "-m", "kubegate.core.cli", "audit", "verify", "--file", *map(str, files)],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 1 and "modified" in cli.stdout, cli.stdout + cli.stderr
