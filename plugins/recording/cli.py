"""`kubegate sessions list` and `kubegate replay`: read the recordings an admin has on the gateway's host.

Both read the gateway's database (and its recordings folder, through the paths stored in each row) from the
config's top level, like `kubegate tokens list`; no gateway needs to run. The imports are lazy because this
module is loaded every time the `kubegate` parser is built.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from kubegate.core.cli import add_config_argument, add_output_argument, hookimpl
from kubegate.core.terminal import escape_controls

if TYPE_CHECKING:
    from .store import SessionRecord


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = sub.add_parser(
        "sessions", help="recorded exec/attach/port-forward sessions (reads the database)"
    )
    sessions_sub = sessions.add_subparsers(dest="sessions_command", metavar="list", required=True)
    listing = sessions_sub.add_parser("list", help="sessions, newest first")
    add_config_argument(listing)
    listing.add_argument("--user", help="only this user's")
    listing.add_argument("--connection", help="only on this connection")
    listing.add_argument("--since", help="only sessions started since: 30m, 1h, 2d or a time (ISO 8601)")
    listing.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
    add_output_argument(listing)
    listing.set_defaults(func=cmd_sessions_list)

    replay = sub.add_parser(
        "replay",
        help="play a recorded session in the terminal, or export its asciicast",
        description="Plays the session's output with its timing (typed input is not echoed a second "
        "time: the terminal's echo is part of the output). Who, where and the exit status go to stderr.",
    )
    replay.add_argument("session_id", metavar="SESSION_ID", nargs="?", help="from kubegate sessions list")
    replay.add_argument(
        "--user", help="instead of one session: this identity's API calls and sessions, in order"
    )
    replay.add_argument(
        "--since", default="1h", help="with --user: from when (30m, 1h, 2d, ISO 8601; default 1h)"
    )
    replay.add_argument("--step", action="store_true", help="with --user: wait for Enter before each session")
    add_config_argument(replay)
    replay.add_argument("--speed", default="1", help="play N times faster (default 1; 0.5 is slower)")
    replay.add_argument(
        "--max-wait", default="2", help="cap pauses at this many seconds, before --speed (default 2; 0: none)"
    )
    replay.add_argument(
        "--export",
        metavar="FILE.cast",
        help="write the asciicast to FILE instead of playing it (- for stdout)",
    )
    replay.set_defaults(func=cmd_replay)


def _positive(name: str, text: str, *, allow_zero: bool = False) -> float:
    from kubegate.core.cli import CLIError

    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{name} must be a number, not {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise CLIError(f"{name} must be {'0 or more' if allow_zero else 'greater than 0'}, not {text}")
    return value


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(record: SessionRecord) -> str:
    if record.ended is None:
        return "running"
    seconds = record.ended - record.started
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _exit(record: SessionRecord) -> str:
    if record.ended is None:
        return "-"
    if record.exit_code is not None:
        return str(record.exit_code)
    return "?" if record.kind != "portforward" else ""


def _what(record: SessionRecord) -> str:
    if record.kind == "portforward":
        return f"ports {record.ports}"
    return shlex.join(record.command) or record.kind


def cmd_sessions_list(args: argparse.Namespace) -> int:
    from kubegate.core.cli import CLIError, database_from_config
    from kubegate.core.db import DatabaseError
    from kubegate.core.since import SinceError, parse_since

    from . import list_sessions

    since = None
    if args.since:
        try:
            since = parse_since(args.since)
        except SinceError as exc:
            raise CLIError(str(exc)) from None
    if args.limit < 1:
        raise CLIError("--limit must be 1 or more")
    database = database_from_config(args.config)
    try:
        records = list_sessions(
            database,
            user=args.user,
            since=since,
            connections=[args.connection] if args.connection else None,
            limit=args.limit,
        )
    except DatabaseError as exc:
        raise CLIError(str(exc)) from None
    finally:
        database.close()
    if args.output == "json":
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    print(
        f"{'ID':<15} {'STARTED':<19} {'DURATION':<9} {'USER':<20} {'CONNECTION':<12} {'KIND':<11} "
        f"{'POD':<30} {'EXIT':<4} COMMAND"
    )
    for r in records:
        pod = f"{r.namespace}/{r.pod}" + (f" ({r.container})" if r.container else "")
        print(
            escape_controls(
                f"{r.id:<15} {_when(r.started):<19} {_duration(r):<9} {r.user:<20} {r.connection:<12} "
                f"{r.kind:<11} {pod:<30} {_exit(r):<4} {_what(r)}"
            )
        )
    return 0


def describe(record: SessionRecord) -> str:
    """One line: who did what where, and when."""
    pod = f"{record.namespace}/{record.pod}" + (f" ({record.container})" if record.container else "")
    return (
        f"session {record.id}: {record.user or '?'} on {record.connection}, {record.kind} {pod}: "
        f"{_what(record)} — started {_when(record.started)}"
    )


def ending(record: SessionRecord) -> str:
    if record.ended is None:
        return f"session {record.id} is still running (or the gateway stopped during it)"
    status = f"exit status {record.exit_code}" if record.exit_code is not None else "no exit status"
    reason = f" ({record.exit_reason})" if record.exit_reason and record.exit_code is None else ""
    gaps = "; the recording has gaps (storage failed)" if record.incomplete else ""
    return f"session {record.id} ended: {status}{reason} after {_duration(record)}{gaps}"


def recording_settings(config: str) -> Any:
    """The gateway-wide `plugins.recording` of the config file, validated as the gateway does (S3 rows need
    its endpoint and credentials)."""
    from pathlib import Path

    from pydantic import ValidationError

    from kubegate.core.cli import CLIError
    from kubegate.core.config import first_error, parse_settings

    from . import PLUGIN_NAME, RecordingSettings

    raw = parse_settings(Path(config)).plugins.get(PLUGIN_NAME) or {}
    try:
        return RecordingSettings.model_validate(raw, context={"base_dir": Path(config).parent})
    except ValidationError as exc:
        key, reason = first_error(exc, f"plugins.{PLUGIN_NAME}")
        raise CLIError(f"{config}: {key}: {reason}") from None


def cmd_replay(args: argparse.Namespace) -> int:
    from kubegate.core.cli import CLIError, database_from_config
    from kubegate.core.db import DatabaseError

    from .cast import CastError, play
    from .storage import RecordingMissing, load_session, read_cast

    speed = _positive("--speed", args.speed)
    max_wait = _positive("--max-wait", args.max_wait, allow_zero=True)
    if args.user or not args.session_id:
        if args.session_id or not args.user:
            raise CLIError("give a SESSION_ID, or --user NAME [--since 1h] for an identity's activity")
        return _walk(args, speed, max_wait)
    database = database_from_config(args.config)
    try:
        record = load_session(database, args.session_id)
        if record is None:
            raise CLIError(f"no session {args.session_id} (see kubegate sessions list)")
        text = read_cast(
            database, record, recording_settings(args.config) if record.storage == "s3" else None
        )
    except DatabaseError as exc:
        raise CLIError(str(exc)) from None
    except RecordingMissing as exc:
        raise CLIError(str(exc)) from None
    finally:
        database.close()
    if args.export:
        if args.export == "-":
            sys.stdout.write(text)
        else:
            try:
                with open(args.export, "w", encoding="utf-8") as file:
                    file.write(text)
            except OSError as exc:
                raise CLIError(f"cannot write {args.export}: {exc.strerror}") from None
            print(f"wrote {args.export} ({len(text.splitlines()) - 1} events)", file=sys.stderr)
        return 0
    print(escape_controls(describe(record)), file=sys.stderr, flush=True)
    out: Any = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")
    try:
        play(text, out, speed=speed, max_wait=max_wait or None)
    except CastError as exc:
        raise CLIError(f"the recording of {record.id} is damaged: {exc}") from None
    print("\r\n" + escape_controls(ending(record)), file=sys.stderr, flush=True)
    return 0


def _walk(args: argparse.Namespace, speed: float, max_wait: float) -> int:
    """`--user`: the identity's audit events in order, each recorded session played where it started."""
    from kubegate.core.cli import CLIError, database_from_config
    from kubegate.core.since import SinceError, parse_since
    from kubegate.plugins.audit.cli import audit_database
    from kubegate.plugins.audit.walk import wait_for_enter, walk

    try:
        since = parse_since(args.since)
    except SinceError as exc:
        raise CLIError(str(exc)) from None
    audit_db, sessions_db = audit_database(args.config), database_from_config(args.config)
    try:
        events, sessions = walk(audit_db, sessions_db, args.user, since, out=sys.stdout, err=sys.stderr,
                                recording_settings=recording_settings(args.config),
                                speed=speed, max_wait=max_wait or None,
                                step=wait_for_enter if args.step else None)  # fmt: skip
    except Exception as exc:  # a database that cannot be read: one line
        from sqlalchemy.exc import SQLAlchemyError

        from kubegate.core.db import DatabaseError

        if isinstance(exc, DatabaseError | SQLAlchemyError):
            raise CLIError(f"cannot read the audit store: {str(exc).splitlines()[0]}") from None
        raise
    finally:
        audit_db.close()
        sessions_db.close()
    print(
        f"{args.user}: {_count(events, 'audit event')}, {_count(sessions, 'session')} played since {_when(since)}",
        file=sys.stderr,
    )
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_commands(subparsers)
