"""The `audit-db` writer process: chains, signs and inserts batches for one gateway process.

Why a process: chaining, signing and the SQLAlchemy/SQLite work of a batch are Python under the GIL; in a
thread of the gateway they take their time from the event loop (issue 15). The gateway keeps its queue,
order, retries and fail-open/fail-closed semantics (sink.py) and hands each batch over a private socket
pair; an event leaves the gateway's queue only after this process answers that its transaction committed.

Protocol (pickle frames of `multiprocessing.connection`, both ends ours): the gateway sends
`("init", url, signing)` once and waits for `("ready", "")` (imports done), then sends `(records, retry)`
per batch and waits for `("ok", "")` or `("error", "Class: first line")`. The process runs in a session of
its own (a terminal's Ctrl-C does not reach it) and ignores SIGINT and SIGTERM (a service manager may still
signal it: the gateway drains its queue through this process before it closes the socket); it exits when the
socket closes — also when the gateway dies, after finishing the batch it holds.
"""

from __future__ import annotations

import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from .sink import SinkFailure

REPLY_SECONDS = 120.0  # a write that takes longer is given up: the process is replaced and the batch retried
START_SECONDS = 60.0  # for a new process to import what it needs and say it is ready


class WriterGone(SinkFailure):
    """The writer process stopped, did not answer in time, or could not be started."""


def one_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"


def frame_of(records: list[dict[str, Any]], retry: bool) -> bytes:
    """A batch as bytes. Records that do not pickle (a value of an unexpected type) go as their JSON form with
    `default=str`, which is exactly what the chain's canonical text makes of them anyway."""
    try:
        return pickle.dumps((records, retry), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        plain = json.loads(json.dumps(records, default=str, ensure_ascii=False))
        return pickle.dumps((plain, retry), protocol=pickle.HIGHEST_PROTOCOL)


class WriterProcess:
    """The gateway's end: `write` blocks (call it from a worker thread, one batch at a time) until the
    process committed the batch, and raises otherwise; a stopped or stuck process is replaced on the next
    write."""

    def __init__(self, url: str, signing: tuple[str, bytes] | None, reply_seconds: float = REPLY_SECONDS):
        self.url, self.signing, self.reply_seconds = url, signing, reply_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None
        self._lock = threading.Lock()  # start (from the loop) and write (from a thread) never overlap
        self._ready = False  # the process said it is ready (its imports done): from then on, REPLY_SECONDS

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if not sys.executable:
            raise WriterGone("cannot start the audit writer process: no Python executable known")
        ours, theirs = socket.socketpair()
        try:
            # -P: the gateway's working directory is not put on the child's import path.
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "kubegate.plugins.audit.writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C (sent to the whole foreground group) would otherwise
                # reach it while it still imports, before it ignores SIGINT, and print a traceback there.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise WriterGone(f"cannot start the audit writer process: {exc.strerror}") from None
        finally:
            theirs.close()
        self.connection = Connection(ours.detach())
        self._ready = False
        # The URL (it may hold a password) and the signing key travel over the socket, never in argv.
        self.connection.send_bytes(pickle.dumps(("init", self.url, self.signing)))

    def write(self, records: list[dict[str, Any]], retry: bool) -> None:
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._stop(kill=True)
                self._start()
            assert self.connection is not None
            try:
                if not self._ready:
                    self._await_ready()
                self.connection.send_bytes(frame_of(records, retry))
                if not self.connection.poll(self.reply_seconds):
                    raise WriterGone(f"the audit writer process did not answer in {self.reply_seconds:.0f} s")
                status, message = pickle.loads(self.connection.recv_bytes())
            except (OSError, EOFError, WriterGone) as exc:
                self._stop(kill=True)
                raise WriterGone(
                    exc.args[0]
                    if isinstance(exc, WriterGone)
                    else f"the audit writer process stopped ({one_line(exc)})"
                ) from None
            if status != "ok":
                raise SinkFailure(message)

    def _await_ready(self) -> None:
        assert self.connection is not None
        if not self.connection.poll(START_SECONDS):
            raise WriterGone(f"the audit writer process did not start in {START_SECONDS:.0f} s")
        status, message = pickle.loads(self.connection.recv_bytes())
        if status != "ready":
            raise WriterGone(f"the audit writer process did not start: {message}")
        self._ready = True

    def close(self, wait_seconds: float = 10.0) -> None:
        with self._lock:
            self._stop(kill=False, wait_seconds=wait_seconds)

    def _stop(self, kill: bool, wait_seconds: float = 5.0) -> None:
        if self.connection is not None:
            self.connection.close()  # the process sees the end of its input and exits
            self.connection = None
        process, self.process = self.process, None
        if process is None:
            return
        if kill:
            process.kill()
        try:
            process.wait(wait_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the process ------------------------------------------------------------------------------------------


def serve(connection: Connection) -> None:
    from kubegate.core.db import Database

    from . import chain, store

    kind, url, signing = pickle.loads(connection.recv_bytes())
    assert kind == "init"
    try:
        signer = chain.Signer(signing[0], signing[1]) if signing is not None else None
    except ValueError as exc:
        connection.send_bytes(pickle.dumps(("error", one_line(exc))))
        return
    connection.send_bytes(pickle.dumps(("ready", "")))
    database: Database | None = None
    try:
        while True:
            try:
                frame = connection.recv_bytes()
            except (EOFError, OSError):
                return  # the gateway closed its end (or died)
            records, retry = pickle.loads(frame)
            try:
                if (
                    database is None
                ):  # opened here, so that a database that cannot be opened is a failed write
                    database = Database(url)
                store.write(database, records, signer, retry=retry)
                reply: tuple[str, str] = ("ok", "")
            except Exception as exc:
                reply = ("error", one_line(exc))
            try:
                connection.send_bytes(pickle.dumps(reply))
            except OSError:
                return
    finally:
        if database is not None:
            database.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(int(sys.argv[1]))
    try:
        serve(connection)
    except (EOFError, OSError):
        # The gateway went away before or between the answers (a demo stopped while this process was
        # still starting): nothing of ours is left to write, and a traceback would only alarm.
        return


if __name__ == "__main__":
    main()
