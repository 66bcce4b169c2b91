"""The audit hash chain in a real database (SQLite and PostgreSQL): `verify` names the first modified,
deleted, inserted or reordered record, a cut tail, a changed search column and a forged signature."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


def signed_file(tmp_path) -> tuple[Path, list[str]]:
    path = tmp_path / "audit.jsonl"
    FileSink(AuditFileSettings(path=path), path, chain.Signer("hmac-sha256", KEY)).write(records(3))
    return path, path.read_text().splitlines(keepends=True)


def verify_file(path: Path, lines: list[str]) -> chain.Problem | None:
    path.write_text("".join(lines))
    return chain.verify(stored_from_files([path]), chain.Signer("hmac-sha256", KEY))[1]


@pytest.mark.parametrize(
    "edit",
    [
        # A first occurrence in the record: a first-wins reader (Fluent Bit, grep) sees alice; the parsed
        # record (last wins), written again, is the signed text.
        lambda line: line.replace('"data":{', '"data":{"identity":{"user":"alice","groups":["admins"]},', 1),
        lambda line: line.replace('"kind":"request"', '"kind":"request","kind":"request"', 1),
        lambda line: line.replace('"kind":"request"', '"kind": "request"', 1),  # a space
        lambda line: line.replace('"kind":"request"', '"kind":"requ\\u0065st"', 1),  # an escape
    ],
    ids=["duplicate-key-first", "duplicate-key", "space", "escape"],
)
def test_a_signed_file_record_whose_text_is_not_canonical_is_modified(tmp_path, edit):
    """`verify --file` hashed the parsed record written again, not the line's text: a duplicate key, a space
    or an escape passed as intact, even signed (red team). Now the line's own record text is checked."""
    path, lines = signed_file(tmp_path)
    assert verify_file(path, lines) is None
    lines[1] = edit(lines[1])
    found = verify_file(path, lines)
    assert found is not None and (found.seq, found.what) == (2, "modified")


def test_a_rehashed_record_with_a_duplicate_key_is_not_canonical(tmp_path):
    """Without signing, whoever recomputes the last record's hash over a text with a duplicate key still gets
    "modified": the text is not the canonical form of what it parses to."""
    path = tmp_path / "audit.jsonl"
    FileSink(AuditFileSettings(path=path), path, None).write(records(2))
    lines = path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[1])
    record = chain.canonical(entry["record"])
    forged = record.replace('"data":{', '"data":{"identity":{"user":"alice","groups":["admins"]},', 1)
    digest = chain.link(entry["prev_hash"], forged)
    lines[1] = f'{{"hash":"{digest}","prev_hash":"{entry["prev_hash"]}","record":{forged},"signature":""}}\n'
    path.write_text("".join(lines))
    found = chain.verify(stored_from_files([path]))[1]
    assert found is not None and (found.seq, found.what) == (2, "modified")
    assert "not canonical JSON (a duplicate key" in found.detail


@pytest.mark.parametrize(
    "edit",
    [
        lambda line, fake: '{"record":' + fake + "," + line[1:],  # a second "record", first
        lambda line, fake: line[:-2] + ',"note":"checked"}\n',  # a key the sink never writes
        lambda line, fake: line.replace('","prev_hash"', '", "prev_hash"', 1),  # a space between keys
        lambda line, fake: line.replace("\n", "\r\n"),
    ],
    ids=["record-twice", "extra-key", "space", "crlf"],
)
def test_a_file_line_not_written_as_the_sink_writes_is_modified(tmp_path, edit):
    path, lines = signed_file(tmp_path)
    fake = json.dumps(json.loads(lines[1])["record"] | {"kind": "approval.approved"})
    lines[1] = edit(lines[1], fake)
    found = verify_file(path, lines)
    assert found is not None and (found.seq, found.what) == (2, "modified"), found
    cli = subprocess.run([sys.executable, "-m", "kubegate.core.cli", "audit", "verify", "--file", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 1 and "record 2: modified" in cli.stdout, cli.stdout + cli.stderr


# -- the canonical text: orjson writes it; records the stdlib wrote still verify -------------------------------


def test_records_written_in_the_stdlib_form_still_verify(database, monkeypatch):
    """Records written before orjson wrote the canonical text (the stdlib's form) verify after it, in the
    database, and after records in the new form; a float below 1e-4 is where the two forms differ."""
    tiny = [{**r, "data": {**r["data"], "latency_ms": 1e-05}} for r in records(3)]
    assert chain.stdlib_canonical(tiny[0]) != chain.canonical(tiny[0])
    monkeypatch.setattr(chain, "canonical", chain.stdlib_canonical)
    database.call(lambda s: store.append(s, tiny, None))
    monkeypatch.undo()
    stored_text = database.call(lambda s: s.get(store.AuditRow, 1)).record
    assert '"latency_ms":1e-05' in stored_text
    database.call(lambda s: store.append(s, [{**r, "data": {**r["data"], "latency_ms": 1e-05}}
                                             for r in records(2, start=3)], None))  # fmt: skip
    assert '"latency_ms":0.00001' in database.call(lambda s: s.get(store.AuditRow, 4)).record
    assert database.call(lambda s: store.verify(s)) == (5, None)
    # Either form, but nothing else: the same content written with a space is not canonical.
    spaced = stored_text.replace('"kind":"request"', '"kind": "request"')
    sql(database, "UPDATE kubegate_audit_events SET record = :record WHERE seq = 1", record=spaced)
    assert problem(database).what == "modified"


def test_an_audit_file_in_the_stdlib_form_still_verifies(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    settings = AuditFileSettings(path=path)
    tiny = [{**r, "data": {**r["data"], "latency_ms": 1e-05}} for r in records(4)]
    monkeypatch.setattr(chain, "canonical", chain.stdlib_canonical)
    FileSink(settings, path, None).write(tiny[:2])
    monkeypatch.undo()
    FileSink(settings, path, None).write(tiny[2:])
    lines = path.read_text().splitlines()
    assert '"latency_ms":1e-05' in lines[0] and '"latency_ms":0.00001' in lines[3]
    assert chain.verify(stored_from_files([path])) == (4, None)
    lines[1] = lines[1].replace('"status":200', '"status":201')
    path.write_text("\n".join(lines) + "\n")
    assert chain.verify(stored_from_files([path]))[1].seq == 2


def test_a_record_orjson_cannot_write_is_written_in_the_stdlib_form(database):
    odd = records(2)
    odd[0]["data"]["big"] = 2**70  # beyond 64 bits
    odd[1]["data"]["by_status"] = {200: 3, 404: 1}  # keys that are not strings
    database.call(lambda s: store.append(s, odd, None))
    texts = database.call(lambda s: [r.record for r in s.exec(store.select(store.AuditRow)).all()])
    assert str(2**70) in texts[0] and '"by_status":{"200":3,"404":1}' in texts[1]
    assert database.call(lambda s: store.verify(s)) == (2, None)


def test_a_lone_surrogate_does_not_stop_the_writer(database):
    """A JSON `\\ud800` escape (a reviewer's comment, a token claim) parses to a string UTF-8 cannot carry:
    the record is written with U+FFFD in its place, and the records after it are written too."""
    bad = records(3)
    bad[1]["data"]["comment"] = "ok \ud800 then"
    bad[1]["data"]["claims"] = {"name\udfff": ["\ud83d"]}
    store.write(database, bad, None)
    store.write(database, records(1, start=3), None)
    texts = database.call(lambda s: [r.record for r in s.exec(store.select(store.AuditRow)).all()])
    assert len(texts) == 4
    assert "\ud800" not in texts[1] and "\ufffd then" in texts[1] and '"name\ufffd"' in texts[1]
    assert database.call(lambda s: store.verify(s)) == (4, None)
    # An escaped lone surrogate in stored text is not a canonical form: edited text is still found.
    sql(database, "UPDATE kubegate_audit_events SET record = :record WHERE seq = 2",
        record=texts[1].replace("\ufffd then", "\\ud800 then"))  # fmt: skip
    assert problem(database).what == "modified"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f == 0 or abs(f) >= 1e-4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_orjson_and_the_stdlib_write_plain_json_the_same(value):
    """Outside floats below 1e-4 the two canonical forms are one text: records mean the same to a verifier
    that uses either, and the old form is needed only where they differ."""
    try:
        stdlib = chain.stdlib_canonical(value)
        stdlib.encode()
    except UnicodeEncodeError:
        return  # lone surrogates: see test_a_lone_surrogate_does_not_stop_the_writer
    assert chain.canonical(value) == stdlib
    assert chain.is_canonical(json.loads(stdlib), stdlib)


# -- the SQLite insert (the driver's own executemany) ----------------------------------------------------------


def test_the_sqlite_insert_writes_every_column_of_the_table():
    assert sorted(store.ROW_FIELDS) == sorted(store.AuditRow.__table__.columns.keys())


def test_sqlite_writers_that_read_the_same_head_do_not_fork_the_chain(tmp_path, monkeypatch):
    """Two writer processes (two workers) on one SQLite file can read the same head: the later insert
    collides on `seq`, which the driver raises as its own IntegrityError; the batch is chained again after
    the other writer's records, none lost, none twice."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    ours, theirs = Database(url), Database(url)
    ours.create_tables()
    real_columns_of = store.columns_of
    interleaved: list[int] = []

    def columns_of(record):
        if not interleaved:  # our head is read, our rows not inserted: the other writer commits first
            interleaved.append(1)
            store.write(theirs, records(3, start=100), None)
        return real_columns_of(record)

    monkeypatch.setattr(store, "columns_of", columns_of)
    store.write(ours, records(2), None)
    monkeypatch.undo()
    rows = ours.call(lambda s: s.exec(store.select(store.AuditRow).order_by(store.AuditRow.seq)).all())
    assert [r.event_id for r in rows] == ["e100", "e101", "e102", "e0", "e1"]
    assert ours.call(lambda s: store.verify(s)) == (5, None)
    ours.close()
    theirs.close()


def test_two_file_sinks_of_one_file_keep_one_chain(tmp_path):
    """After a reload the old sink (finishing its requests) and the new one write the same file, in turns,
    through rotations: each continues from the other's last line, so the chain stays one."""
    path = tmp_path / "audit.jsonl"
    settings = AuditFileSettings(path=path, max_bytes=1024, keep=50)
    old, new = FileSink(settings, path, None), FileSink(settings, path, None)
    for turn, start in enumerate(range(0, 30, 2)):
        (old if turn % 3 else new).write(records(2, start))
    files = [*sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:])), path]
    assert len(files) > 3  # it rotated, under both sinks
    assert chain.verify(stored_from_files(files), trust_first=True) == (30, None)


def test_a_column_no_database_can_hold_does_not_stop_the_writer(database):
    """A request path with `%00` (before anyone authenticates) puts NUL in the namespace and name, which
    PostgreSQL text cannot hold; a lone surrogate in a user name (a token claim's JSON escape) goes into no
    database. The batch failed on every retry, and nothing after it was recorded. Now the search columns hold
    U+FFFD there, the record keeps what it can, and the chain verifies."""
    bad = records(3)
    bad[1]["data"]["attributes"].update(namespace="a\x00b", name="x\x00y", resource="pods\x00")
    bad[1]["data"]["kubectl_command"] = "get\x00pods"
    bad[2]["data"]["identity"]["user"] = "mal\ud800lory"
    store.write(database, bad, None)
    store.write(database, records(1, start=3), None)
    rows = database.call(lambda s: s.exec(store.select(store.AuditRow).order_by(store.AuditRow.seq)).all())
    assert len(rows) == 4
    assert (rows[1].namespace, rows[1].name, rows[1].kubectl_command) == (
        "a\ufffdb",
        "x\ufffdy",
        "get\ufffdpods",
    )
    assert '"namespace":"a\\u0000b"' in rows[1].record  # the record itself keeps the NUL, escaped
    assert rows[2].user == "mal\ufffdlory"
    assert database.call(lambda s: store.verify(s)) == (4, None)
    # The columns are still checked against the record: an edited one is found.
    sql(database, "UPDATE kubegate_audit_events SET namespace = 'prod' WHERE seq = 2")
    assert problem(database).what == "modified"


def test_a_file_whose_last_record_is_longer_than_a_megabyte_goes_on_after_a_restart(tmp_path):
    """A request's record can be longer than a megabyte (a User-Agent of 600,000 double quotes, JSON-escaped).
    The new sink of a restarted gateway read only the file's last megabyte to find where the chain goes on,
    misread that line, and the gateway refused to start."""
    path = tmp_path / "audit.jsonl"
    settings = AuditFileSettings(path=path)
    first = records(3)
    first[1]["data"]["user_agent"] = "k" * 1_500_000
    first[2]["data"]["user_agent"] = "curl/8 " + "\n" * 3 + "x" * 2_100_000  # newlines inside, escaped
    FileSink(settings, path, None).write(first)
    assert len(path.read_bytes().splitlines()[-1]) > 2_000_000
    restarted = FileSink(settings, path, None)  # what the gateway's start does
    assert restarted.seq == 3
    restarted.write(records(2, start=3))
    assert chain.verify(stored_from_files([path])) == (5, None)


def test_a_last_line_that_is_no_record_is_named_in_one_line(tmp_path):
    """A write cut short (a crash mid-line) leaves a last line that is no record: the chain cannot go on from
    it, and the error says which file and why instead of a bare JSON error."""
    path = tmp_path / "audit.jsonl"
    FileSink(AuditFileSettings(path=path), path, None).write(records(2))
    with path.open("ab") as out:
        out.write(b'{"hash":"ab12", "prev_hash"')
    with pytest.raises(
        ValueError, match=r"audit.jsonl: its last line is not an audit record \(JSONDecodeError"
    ):
        FileSink(AuditFileSettings(path=path), path, None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"\n")), st.integers(min_value=1, max_value=9))
def test_the_last_line_is_found_across_blocks_of_any_size(data, block):
    """The backwards read gives what reading the whole file would, wherever the blocks' edges fall."""
    import tempfile
    from pathlib import Path

    from kubegate.plugins.audit.file import _last_line

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "f"
        path.write_bytes(data)
        assert _last_line(path, block) == data.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
