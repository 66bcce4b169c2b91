"""The `audit-db` writer process (plugins/audit/writer.py): batches written by a process of their own keep
order, the chain and signatures; a writer process that is killed — between batches or under a stream of
events — is replaced and loses or doubles nothing; a retried batch whose first attempt did commit is not
written twice; a fail-closed sink whose writer cannot write gates requests until it can."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from kubegate.core.db import Database
from kubegate.core.errors import StatusError
from kubegate.core.flow import AuditEvent
from kubegate.plugins.audit import chain, store
from kubegate.plugins.audit.database import AuditDbSettings, DatabaseSink, shareable
from kubegate.plugins.audit.writer import WriterGone, WriterProcess, frame_of

KEY = b"an hmac key of at least sixteen bytes"


def records(count: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"e{i}", "time": 1000.0 + i, "kind": "request", "connection": "prod", "request_id": f"r{i}",
         "data": {"identity": {"user": "alice", "groups": ["developers"]}, "status": 200}}
        for i in range(start, start + count)
    ]  # fmt: skip


def event(number: int) -> AuditEvent:
    return AuditEvent(kind="request", flow_id=f"r{number}", connection="prod", time=1000.0 + number,
                      data={"identity": {"user": "alice"}, "status": 200, "n": number})  # fmt: skip


@pytest.fixture
def database(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    db.create_tables()
    yield db
    db.close()


def stored_ids(db: Database) -> list[str]:
    return db.call(lambda s: [record["id"] for record in store.search(s, store.Filters(), 100_000)])


def wait_exit(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if finished:
            return True
        time.sleep(0.05)
    return False


def test_batches_from_the_process_keep_order_chain_and_signatures(database):
    writer = WriterProcess(database.url, ("hmac-sha256", KEY))
    writer.start()
    try:
        writer.write(records(3), retry=False)
        writer.write(records(4, start=3), retry=False)
    finally:
        writer.close()
    assert stored_ids(database) == [f"e{i}" for i in range(7)]
    signer = chain.Signer("hmac-sha256", KEY)
    assert database.call(lambda s: store.verify(s, signer)) == (7, None)
    # Signed with the key, not merely chained: another key does not verify.
    other = chain.Signer("hmac-sha256", b"another key of sixteen bytes or more")
    assert database.call(lambda s: store.verify(s, other))[1].what == "unsigned"


def test_a_killed_process_is_replaced_and_the_failed_write_raises(database):
    writer = WriterProcess(database.url, None)
    writer.start()
    try:
        writer.write(records(2), retry=False)
        first = writer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_exit(first)
        # The next write finds it gone and starts another; nothing written before is touched.
        writer.write(records(2, start=2), retry=False)
        assert writer.pid not in (None, first)
    finally:
        writer.close()
    assert database.call(lambda s: store.verify(s)) == (4, None)


def test_a_write_the_process_cannot_answer_raises_writer_gone(database):
    writer = WriterProcess(database.url, None)
    writer.start()
    try:
        writer.write(records(1), retry=False)  # the first write opens the database: not timed
        writer.reply_seconds = 1.0
        pid = writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # stuck: alive but silent
        with pytest.raises(WriterGone, match="did not answer"):
            writer.write(records(2), retry=False)
        assert wait_exit(pid), "the stuck process was not killed"
        writer.reply_seconds = 120.0  # the new process opens the database again: not timed either
        writer.write(records(2), retry=True)  # a new process; the retry writes the new record once
    finally:
        writer.close()
    assert stored_ids(database) == ["e0", "e1"]


def test_the_process_ignores_sigterm_and_sigint_and_exits_when_the_gateway_closes(database):
    """A service manager or a Ctrl-C signals the whole group: the writer must stay to drain the queue."""
    writer = WriterProcess(database.url, None)
    writer.start()
    pid = writer.pid
    assert pid is not None
    try:
        writer.write(records(1), retry=False)  # it is up and has installed its handlers
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        writer.write(records(1, start=1), retry=False)
        assert writer.pid == pid
    finally:
        writer.close()
    assert wait_exit(pid, 0.5)
    assert stored_ids(database) == ["e0", "e1"]


def test_a_batch_in_the_writers_hands_is_written_when_the_gateway_dies(database):
    """The gateway is killed right after handing a batch over: the writer commits it, then sees its input
    end and exits (no orphan process left behind)."""
    writer = WriterProcess(database.url, None)
    writer.start()
    writer.write(records(1), retry=False)
    pid = writer.pid
    assert pid is not None and writer.connection is not None
    writer.connection.send_bytes(frame_of(records(1, start=1), retry=False))
    writer.connection.close()  # what the kernel does to the gateway's end when the gateway dies
    writer.connection, writer.process = None, None
    assert wait_exit(pid, 30), "the writer outlived the gateway"
    assert stored_ids(database) == ["e0", "e1"]


def test_a_retried_batch_that_was_committed_is_not_written_twice(database):
    """The first attempt committed but its answer was lost: the retry (with more events queued behind)
    writes only the new ones."""
    writer = WriterProcess(database.url, None)
    writer.start()
    try:
        writer.write(records(3), retry=False)
        writer.write(records(5), retry=True)
    finally:
        writer.close()
    assert stored_ids(database) == [f"e{i}" for i in range(5)]
    assert database.call(lambda s: store.verify(s)) == (5, None)


def test_without_retry_nothing_is_looked_up_or_skipped(database):
    """The dedup applies to retries only; a first attempt is written as given (the check would catch a
    writer that silently dropped records it thought it had seen)."""
    store.write(database, records(2), None)
    store.write(database, records(1, start=2), None)
    assert stored_ids(database) == ["e0", "e1", "e2"]


def test_a_value_that_does_not_pickle_is_stored_as_the_chain_renders_it(database):
    class Opaque:
        def __reduce__(self):
            raise TypeError("no pickling")

        def __str__(self) -> str:
            return "opaque-value"

    batch = records(1)
    batch[0]["data"]["odd"] = Opaque()
    writer = WriterProcess(database.url, None)
    writer.start()
    try:
        writer.write(batch, retry=False)
    finally:
        writer.close()
    [row] = database.call(lambda s: store.search(s, store.Filters(), 10))
    assert row["data"]["odd"] == "opaque-value"
    assert database.call(lambda s: store.verify(s)) == (1, None)


def test_only_databases_another_process_can_open_get_a_process():
    assert shareable("sqlite:////var/lib/kubegate/kubegate.db")
    assert shareable("postgresql+psycopg://u:p@db/kubegate")
    assert not shareable("sqlite://")
    assert not shareable("sqlite:///:memory:")


async def test_a_stream_survives_its_writer_being_killed_again_and_again(database):
    """2,000 events while the writer process is SIGKILLed every few batches: every event stored exactly
    once, in submission order, the chain intact."""
    settings = AuditDbSettings(linger_ms=1, batch_max=50)
    sink = DatabaseSink(settings, database, None, process=WriterProcess(database.url, None))
    sink.start()
    killed = 0

    async def killer() -> None:
        nonlocal killed
        while True:
            await asyncio.sleep(0.15)
            pid = sink.process.pid if sink.process is not None else None
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass

    killing = asyncio.create_task(killer())
    events = [event(i) for i in range(2000)]
    for number, item in enumerate(events):
        await sink.submit(item)
        if number % 20 == 0:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)
    killing.cancel()
    await sink.close(drain_seconds=60)
    assert killed >= 3
    assert stored_ids(database) == [item.id for item in events]
    assert database.call(lambda s: store.verify(s)) == (2000, None)


async def test_a_fail_closed_sink_whose_writer_cannot_write_gates_then_recovers(tmp_path):
    """The database file cannot be opened (its directory is a file): the writer answers with the error, the
    fail-closed request's wait ends, new requests get 503; once the path is usable the queued event is
    written and requests pass again."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'kubegate.db'}"
    settings = AuditDbSettings(on_failure="closed", linger_ms=0)
    database = Database(f"sqlite:///{tmp_path / 'unused.db'}")  # the sink writes through the process only
    sink = DatabaseSink(settings, database, None, owns_database=True, process=WriterProcess(url, None))
    sink.start()
    item = event(1)
    await asyncio.wait_for(sink.submit(item), 30)
    with pytest.raises(StatusError) as refused:
        sink.gate()
    assert refused.value.code == 503
    assert "FileExistsError" in refused.value.message and "RuntimeError" not in refused.value.message
    blocker.unlink()
    blocker.mkdir()
    Database(url).create_tables()
    for _ in range(300):  # the retry backoff is at most 1 s
        if sink.healthy:
            break
        await asyncio.sleep(0.1)
    sink.gate()  # passes again
    await sink.close()
    written = Database(url)
    assert stored_ids(written) == [item.id]
    written.close()


def test_a_gateway_gone_before_the_writer_answers_leaves_no_traceback(database, tmp_path):
    """A demo stopped while its writer still starts: the writer's `ready` finds the socket closed."""
    import pickle
    import socket
    import subprocess
    import sys
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "kubegate.plugins.audit.writer", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    theirs.close()
    gateway_end = Connection(ours.detach())
    gateway_end.send_bytes(pickle.dumps(("init", database.url, None)))
    gateway_end.close()  # gone before the writer has even imported what it needs
    assert process.wait(60) == 0
    assert b"Traceback" not in stderr.read_bytes(), stderr.read_text()
