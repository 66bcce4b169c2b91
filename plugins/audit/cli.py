"""`kubegate audit search|commands|export|verify`: read the `audit-db` store (or verify `audit-file` files)
straight from the database the config names — no gateway needs to run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kubegate.core.cli import add_config_argument, add_output_argument, hookimpl
from kubegate.core.terminal import escape_controls


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="search, group, export and verify audit records")
    audit_sub = audit.add_subparsers(
        dest="audit_command", metavar="search|commands|export|verify", required=True
    )
    for name, text in [
        ("search", "audit events matching filters, oldest first"),
        ("commands", "API calls grouped by kubectl command: who ran what, how many calls, how many denied"),
        ("export", "matching events as JSON lines with their chain fields"),
    ]:
        p = audit_sub.add_parser(name, help=text)
        add_config_argument(p)
        add_filters(p)
        p.add_argument(
            "--limit", type=int, default=200 if name != "export" else 0, help="most recent N (0: all)"
        )
        if name != "export":  # export writes JSON lines, always
            add_output_argument(p)
        p.set_defaults(func=cmd_audit)
    verify = audit_sub.add_parser("verify", help="check the hash chain: the first modified, deleted, inserted "
                                  "or reordered record")  # fmt: skip
    add_config_argument(verify)
    verify.add_argument("--file", nargs="+", type=Path, help="verify audit-file files instead (oldest first)")
    verify.add_argument(
        "--key-file", type=Path, help="the signing key (or Ed25519 public key) to check signatures"
    )
    verify.add_argument("--algorithm", choices=["hmac-sha256", "ed25519"], help="of --key-file")
    verify.set_defaults(func=cmd_audit)


def add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", help="the caller's user name")
    p.add_argument("--group", help="a group of the caller")
    p.add_argument("--connection", help="the connection (cluster)")
    p.add_argument("--verb", help="get, list, create, delete, … (the API verb)")
    p.add_argument("--resource", help="pods, secrets, pods/exec, …")
    p.add_argument("--namespace", "-n", help="the namespace")
    p.add_argument("--decision", help="allow, deny or unauthenticated")
    p.add_argument("--kind", help="request, session_start, session_end, approval.requested, …")
    p.add_argument("--since", help="30m, 1h, 2d or an ISO 8601 time")
    p.add_argument("--until", help="as --since")
    p.add_argument("--command", dest="kubectl_command", help="text the kubectl command line contains")
    p.add_argument("--session", help="a Kubectl-Session id")


def filters_from_args(args: argparse.Namespace) -> Any:
    from kubegate.core.cli import CLIError
    from kubegate.core.since import parse_since

    from .store import Filters

    try:
        return Filters(user=args.user, group=args.group, connection=args.connection, verb=args.verb,
                       resource=args.resource, namespace=args.namespace, decision=args.decision, kind=args.kind,
                       since=parse_since(args.since) if args.since else None,
                       until=parse_since(args.until) if args.until else None,
                       command=args.kubectl_command, session=args.session)  # fmt: skip
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def audit_database(config: str) -> Any:
    """The database audit-db writes to: its own `url`, else the gateway's."""
    from pydantic import ValidationError

    from kubegate.core.cli import CLIError, database_from_config
    from kubegate.core.config import parse_settings
    from kubegate.core.db import Database, DatabaseError

    from .database import PLUGIN_NAME, AuditDbSettings

    raw = parse_settings(Path(config)).plugins.get(PLUGIN_NAME) or {}
    try:
        settings = AuditDbSettings.model_validate(raw)
    except ValidationError as exc:
        raise CLIError(f"{config}: plugins.{PLUGIN_NAME}: {exc.errors()[0]['msg']}") from None
    if not settings.url:
        return database_from_config(config)
    try:
        return Database(settings.url)
    except DatabaseError as exc:
        raise CLIError(str(exc)) from None


def cmd_audit(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from kubegate.core.cli import CLIError
    from kubegate.core.db import DatabaseError

    from . import chain, store

    if args.audit_command == "verify":
        signer = None
        if args.key_file:
            if not args.algorithm:
                raise CLIError("--key-file needs --algorithm hmac-sha256 or ed25519")
            try:
                signer = chain.Signer.from_file(args.algorithm, args.key_file)
            except ValueError as exc:
                raise CLIError(str(exc)) from None
        if args.file:
            from .file import stored_from_files

            try:
                checked, problem = chain.verify(stored_from_files(args.file), signer, trust_first=True)
            except OSError as exc:
                raise CLIError(f"cannot read {exc.filename}: {exc.strerror}") from None
            head = None
        else:
            database = audit_database(args.config)
            try:
                checked, problem = database.call(lambda s: store.verify(s, signer))
                head = database.call(store.head)
            except (DatabaseError, SQLAlchemyError) as exc:
                raise CLIError(f"cannot read the audit store: {str(exc).splitlines()[0]}") from None
        if problem is not None:
            print(escape_controls(f"BROKEN after {checked} intact records: {problem}"))
            return 1
        print(f"intact: {checked} records" + (f"; head {head[0]} {head[1]}" if head else ""))
        if head:
            print("Keep the head somewhere the database's administrators cannot write: a later `verify` "
                  "that ends before it means records were cut from the end.")  # fmt: skip
        return 0

    filters = filters_from_args(args)
    database = audit_database(args.config)
    try:
        if args.audit_command == "export":
            for line in database.call(lambda s: list(store.export(s, filters))):
                sys.stdout.write(line + "\n")
            return 0
        limit = args.limit or 1_000_000
        if args.audit_command == "commands":
            items = database.call(lambda s: store.commands(s, filters, limit))
        else:
            items = database.call(lambda s: store.search(s, filters, limit))
    except (DatabaseError, SQLAlchemyError) as exc:
        raise CLIError(f"cannot read the audit store: {str(exc).splitlines()[0]}") from None
    if args.output == "json":
        print(json.dumps(items, indent=2, default=str))
    elif args.audit_command == "commands":
        for group in items:
            print(escape_controls(describe_command(group)))
    else:
        for record in items:
            print(escape_controls(describe_event(record)))
    return 0


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_command(group: dict[str, Any]) -> str:
    """`alice ran `kubectl delete` on prod → 3 calls, 1 denied, approved by rita`."""
    first = group["requests"][0]
    called = " ".join(x for x in (first["verb"], first["resource"] or first.get("path", "")) if x)
    outcome = f"{group['calls']} call{'s' if group['calls'] != 1 else ''}"
    if group["denied"]:
        outcome += f", {group['denied']} denied"
    if group["failed"]:
        outcome += f", {group['failed']} failed"
    if group.get("approved_by"):
        outcome += f", approved by {', '.join(group['approved_by'])}"
    # kubectl's Kubectl-Command header names the command without its arguments ("kubectl delete")
    tool = f"ran `{kubectl_command(group['command'])}`" if group["command"] else f"called {called}"
    return f"{when(group['started'])}  {group['user'] or '(unauthenticated)'} {tool} on {group['connection']} → {outcome}"


def kubectl_command(header: str) -> str:
    """The Kubectl-Command header as a command line: it already starts with `kubectl` (never twice)."""
    return header if header.split(" ", 1)[0] == "kubectl" else f"kubectl {header}"


# Subresources that open a session: the GET that upgrades is the session, named as kubectl names it.
SESSION_SUBRESOURCES = {"exec": "exec", "attach": "attach", "portforward": "port-forward"}


def describe_target(data: dict[str, Any]) -> str:
    """What a record is about: `delete pods web-0 -n prod`, `exec pods web -n prod`, `get /version`."""
    attributes = data.get("attributes") or {}
    verb = attributes.get("verb") or data.get("verb") or ""
    resource = attributes.get("resource") or data.get("resource") or ""
    name = attributes.get("name") or data.get("name") or ""
    namespace = attributes.get("namespace") or data.get("namespace") or ""
    path = (attributes.get("path") or data.get("path") or "").split("?", 1)[0]
    subresource = attributes.get("subresource") or ""
    if not subresource and "/" in resource:  # approval records: `pods/exec`
        resource, subresource = resource.split("/", 1)
    if subresource in SESSION_SUBRESOURCES:
        verb = SESSION_SUBRESOURCES[subresource]
    elif subresource:
        resource = f"{resource}/{subresource}"
    if not resource:  # /version, /api, /openapi/v3…: the path says what it was
        return " ".join(x for x in (verb, path) if x)
    what = " ".join(x for x in (verb, resource, name) if x)
    if namespace:
        what += f" -n {namespace}"
    command = data.get("command")
    if command and isinstance(command, list) and verb in ("exec", "attach"):
        what += ": " + shlex.join(map(str, command))
    return what


def _approval_note(kind: str, data: dict[str, Any]) -> str:
    """Who decided: an approval event names its reviewer; a request that was held names its approvers."""
    if kind in ("approval.approved", "approval.partial"):
        return f"approved by {data.get('reviewer') or '?'}"
    if kind == "approval.denied":
        return f"denied by {data.get('reviewer') or '?'}"
    if kind == "approval.requested":
        return f"held by rule {data['rule']}" if data.get("rule") else "held"
    approval = data.get("approval")
    if isinstance(approval, dict) and approval.get("approvers"):
        return f"({approval.get('state', 'approved')} by {', '.join(approval['approvers'])})"
    if isinstance(approval, dict) and approval.get("denied_by"):
        return f"(denied by {approval['denied_by']})"
    return ""


def describe_event(record: dict[str, Any]) -> str:
    data = record.get("data") or {}
    identity = data.get("identity") or {}
    user = identity.get("user") or data.get("requester") or data.get("user") or "-"
    what = describe_target(data)
    decision = (data.get("decision") or {}).get("verdict", "")
    if data.get("auth_failure"):
        decision = "unauthenticated"
    status = data.get("status", "")
    outcome = " ".join(str(x) for x in (status, decision, _approval_note(record["kind"], data)) if x)
    command = f"  [{kubectl_command(data['kubectl_command'])}]" if data.get("kubectl_command") else ""
    if record["kind"] == "mcp_tool":  # an agent's tool call (the mcp plugin): tool, target, reason
        what, outcome = describe_tool_call(data), str(data.get("outcome") or "")
    return (f"{when(record['time'])}  #{record.get('seq', '?'):<6} {record['kind']:<18} {user:<20} "
            f"{record['connection']:<10} {what}  {outcome}".rstrip() + command)  # fmt: skip


def describe_tool_call(data: dict[str, Any]) -> str:
    """`mcp delete pods worker -n prod — "why"`: an MCP tool call, as its (masked) arguments name it."""
    arguments = data.get("arguments") or {}
    pod = arguments.get("pod")
    target = describe_target({"resource": arguments.get("resource") or ("pods" if pod else ""),
                              "name": arguments.get("name") or pod or "", "namespace": arguments.get("namespace") or ""})  # fmt: skip
    reason = json.dumps(data.get("intent") or "", ensure_ascii=False)
    return " ".join(x for x in ("mcp", str(data.get("tool", "?")), target) if x) + f" — {reason}"


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_commands(subparsers)
