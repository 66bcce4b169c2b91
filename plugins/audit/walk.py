"""`kubegate replay --user NAME --since 1h`: an identity's activity, step by step — its API calls from the
audit store in order, and each recorded exec/attach session played where it happened."""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from typing import Any, TextIO

from kubegate.core.db import Database
from kubegate.core.terminal import escape_controls

from . import store
from .cli import describe_event


def walk(audit_db: Database, sessions_db: Database, user: str, since: float, *, out: TextIO, err: TextIO,
         recording_settings: Any = None,
         speed: float = 1.0, max_wait: float | None = 2.0, step: Callable[[], None] | None = None,
         sleep: Callable[[float], None] | None = None) -> tuple[int, int]:  # fmt: skip
    """Print `user`'s audit events since `since`, playing each recorded session after its start event;
    `step` (if given) is called before each session (to wait for Enter). Returns (events, sessions)."""
    import time

    from kubegate.plugins.recording import play
    from kubegate.plugins.recording.storage import RecordingMissing, read_cast
    from kubegate.plugins.recording.store import SessionRecord

    events = audit_db.call(lambda s: store.search(s, store.Filters(user=user, since=since), limit=100_000))
    played = 0
    for record in events:
        print(escape_controls(describe_event(record)), file=err, flush=True)
        if record["kind"] != "session_start":
            continue
        request_id = record["request_id"]
        session = sessions_db.call(functools.partial(_session_of, model=SessionRecord, request_id=request_id))
        if session is None:
            continue
        if step is not None:
            step()
        try:
            text = read_cast(sessions_db, session, recording_settings)
        except RecordingMissing as exc:
            print(escape_controls(f"  (recording {session.id} is missing: {exc})"), file=err)
            continue
        what = shlex.join(session.command) or session.kind
        print(escape_controls(f"  ── session {session.id}: {what} ──"), file=err, flush=True)
        play(text, out, speed=speed, max_wait=max_wait, sleep=sleep or time.sleep)
        print(f"\r\n  ── end of session {session.id} (exit {session.exit_code}) ──", file=err, flush=True)
        played += 1
    return len(events), played


def _session_of(session: Any, model: Any, request_id: str) -> Any:
    from sqlmodel import select

    return session.exec(select(model).where(model.request_id == request_id)).first()


def wait_for_enter() -> None:
    if sys.stdin.isatty():
        input("  [Enter] to play the session ")
