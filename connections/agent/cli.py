"""`kubegate agents join-token|list|revoke`: enrol network-resident agents, see their tunnels, end an agent's
identity — straight from the database the config names; no gateway needs to run."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubegate.core.cli import add_config_argument, add_output_argument, hookimpl

if TYPE_CHECKING:  # pydantic models: imported when a command runs, not on every `kubegate` start
    from .settings import AgentGatewaySettings

AGENT_TYPE = "agent"
MAX_TTL_SECONDS = 7 * 86400
DEFAULT_IDENTITY_FILE = "/var/lib/kubegate-agent/id_ed25519"
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(sub: argparse._SubParsersAction) -> None:
    agents = sub.add_parser("agents", help="enrol network-resident agents, list their tunnels, revoke them")
    agents_sub = agents.add_subparsers(dest="agents_command", metavar="join-token|list|revoke", required=True)

    join = agents_sub.add_parser(
        "join-token",
        help="a single-use token an agent enrols with, and a ready-to-edit agent.yaml",
        description="Mint a single-use join token for `kubegate agent --join-token`. The token is shown once.",
    )
    add_config_argument(join)
    join.add_argument(
        "--connection",
        action="append",
        required=True,
        metavar="NAME",
        help="a `type: agent` connection the agent will serve (repeat for several)",
    )
    join.add_argument(
        "--name", default="", help="the only name the agent may enrol under (default: its choice)"
    )
    join.add_argument(
        "--ttl", default="1h", help="how long the token can be used: 30m, 1h, 2d or seconds (max 7d)"
    )
    add_output_argument(join)
    join.set_defaults(func=cmd_agents)

    listing = agents_sub.add_parser("list", help="enrolled agents and their tunnels to the gateway replicas")
    add_config_argument(listing)
    listing.add_argument("--all", action="store_true", help="include revoked agents")
    add_output_argument(listing)
    listing.set_defaults(func=cmd_agents)

    revoke = agents_sub.add_parser("revoke", help="end an agent's identity: its key no longer logs in")
    add_config_argument(revoke)
    revoke.add_argument("name", help="the agent's name (from `kubegate agents list`)")
    revoke.set_defaults(func=cmd_agents)


def parse_ttl(text: str) -> float:
    """Seconds from `30m`, `1h`, `2d`, `90s` or a plain number of seconds; ValueError past 7 days."""
    match = _TTL.match(text)
    if not match:
        raise ValueError(f"--ttl {text!r}: give a duration such as 30m, 1h, 2d, or seconds")
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"--ttl {text!r}: must be more than 0 and at most 7d")
    return seconds


def iso_utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(t: float | None, now: float) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`; `never` for None."""
    if t is None:
        return "never"
    seconds = max(0, int(now - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def agent_settings(config: str, raw: dict[str, Any] | None) -> AgentGatewaySettings:
    from pydantic import ValidationError

    from kubegate.core.cli import CLIError

    from .settings import PLUGIN_NAME, AgentGatewaySettings

    try:
        return AgentGatewaySettings.model_validate(raw or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise CLIError(f"{config}: plugins.{PLUGIN_NAME}.{where}: {error['msg']}") from None


def agent_address(settings: Any, agents: AgentGatewaySettings) -> tuple[str, bool]:
    """HOST:PORT agents dial, and whether it is a placeholder to replace (the listener takes every address)."""
    from .settings import DEFAULT_PORT

    if agents.listen:
        host = agents.listen.rpartition(":")[0].strip("[]")
        address = agents.listen
    else:
        host = settings.host
        address = f"[{host}]:{DEFAULT_PORT}" if ":" in host else f"{host}:{DEFAULT_PORT}"
    if host in ("", "0.0.0.0", "::"):  # listening on every address: no address to dial, a name is needed
        return f"GATEWAY-HOST:{address.rpartition(':')[2]}", True
    return address, False


def cmd_agents(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from kubegate.core.cli import CLIError, database_from_config
    from kubegate.core.config import parse_settings
    from kubegate.core.db import DatabaseError

    from .settings import PLUGIN_NAME

    settings = parse_settings(Path(args.config))
    agents = agent_settings(args.config, settings.plugins.get(PLUGIN_NAME))
    database = database_from_config(args.config)
    try:
        if args.agents_command == "join-token":
            return join_token(args, settings, agents, database)
        if args.agents_command == "list":
            return list_agents(args, agents, database)
        return revoke(args, agents, database)
    except (DatabaseError, SQLAlchemyError) as exc:
        raise CLIError(f"cannot use the database: {str(exc).splitlines()[0]}") from None
    finally:
        database.close()


def join_token(args: argparse.Namespace, settings: Any, agents: AgentGatewaySettings, database: Any) -> int:
    from kubegate.core.cli import CLIError

    from . import keys, store

    connections = list(dict.fromkeys(args.connection))
    for name in connections:
        connection = settings.connections.get(name)
        if connection is None:
            raise CLIError(
                f"no connection {name!r} in {args.config} (have: {', '.join(settings.connections)})"
            )
        if connection.type != AGENT_TYPE:
            raise CLIError(f"connection {name!r} is `type: {connection.type}`, not `type: {AGENT_TYPE}`")
    if args.name and not store.valid_agent_name(args.name):
        raise CLIError(f"--name {args.name!r}: lower-case letters, digits, '-' and '.' (at most 63)")
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        host_key = keys.fingerprint(
            keys.gateway_host_key(agents, Path(args.config).resolve().parent, database)
        )
    except keys.HostKeyError as exc:
        raise CLIError(str(exc)) from None
    by = f"admin ({getpass.getuser()})"
    token, record = database.call(
        lambda s: store.mint_join_token(s, connections, ttl_seconds=ttl, agent_name=args.name, created_by=by)
    )
    address, wildcard = agent_address(settings, agents)
    expires = iso_utc(record.expires_at)
    if args.output == "json":
        print(json.dumps({"token": token, "token_id": record.id, "expires_at": expires, "host_key": host_key,
                          "connections": connections, "name": args.name, "gateways": [address]}))  # fmt: skip
        return 0
    print(f"Join token (shown once; single use; expires {expires}):\n\n  {token}\n")
    print(f"Gateway SSH host key: {host_key}")
    print(f"Connections: {', '.join(connections)}\n")
    print("# agent.yaml: edit, then run the agent next to the cluster")
    name_note = "" if args.name else "  # any name: lower-case letters, digits, '-' and '.'"
    print(f"name: {args.name or 'my-agent'}{name_note}")
    gateway_note = (
        "  # replace: a name that resolves to every gateway replica"
        if wildcard
        else "  # every replica's address"
    )
    print(f"gateways: [{json.dumps(address)}]{gateway_note}")
    print(f'gateway_host_key: "{host_key}"')
    print(f"identity_file: {DEFAULT_IDENTITY_FILE}  # created at enrolment")
    print("connections:")
    for name in connections:
        print(f"  {name}:\n    in_cluster: true  # or kubeconfig/context, or token_file + server")
    print(f"\nkubegate agent --config agent.yaml --join-token {token}")
    return 0


def list_agents(args: argparse.Namespace, agents: AgentGatewaySettings, database: Any) -> int:
    from . import store

    now = time.time()
    # A replica heartbeats every heartbeat_seconds; three missed and the tunnel counts as gone.
    stale_after = 3 * agents.heartbeat_seconds
    items = database.call(
        lambda s: store.list_agents(s, include_revoked=args.all, stale_after=stale_after, now=now)
    )
    for item in items:
        item["state"] = state_of(item)
    if args.output == "json":
        print(json.dumps(items, indent=2))
        return 0
    rows = [["NAME", "STATE", "CONNECTIONS", "TUNNELS", "VERSION", "SINCE", "LAST HEARTBEAT"]]
    for item in items:
        tunnels = item["tunnels"]
        if item["state"] == "revoked":
            since = item["revoked_at"]
        elif tunnels:
            since = min(t["connected_at"] for t in tunnels)
        else:
            since = item["last_seen"] or item["enrolled_at"]
        versions = sorted({t["version"] for t in tunnels if t["version"]}) or [item["version"]]
        heartbeat = max((t["last_seen"] for t in tunnels), default=item["last_seen"])
        rows.append([
            item["name"],
            item["state"],
            ",".join(item["connections"]) or "-",
            ",".join(sorted({t["replica"] for t in tunnels})) or "-",
            ",".join(v for v in versions if v) or "-",
            age(since, now),
            age(heartbeat, now),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def state_of(item: dict[str, Any]) -> str:
    if item["revoked_at"] is not None:
        return "revoked"
    return "connected" if item["tunnels"] else "disconnected"


def revoke(args: argparse.Namespace, agents: AgentGatewaySettings, database: Any) -> int:
    from kubegate.core.cli import CLIError

    from . import store

    by = f"admin ({getpass.getuser()})"
    if not database.call(lambda s: store.revoke_agent(s, args.name, by=by)):
        agent = database.call(lambda s: store.find_agent(s, args.name))
        raise CLIError(f"agent {args.name!r} is already revoked" if agent else f"no agent {args.name!r}")
    agent = database.call(lambda s: store.find_agent(s, args.name))
    print(
        f"revoked agent {args.name} (key {agent.fingerprint if agent else '?'}): its key no longer logs in."
    )
    print(
        f"Each gateway replica closes its open tunnels within one heartbeat ({agents.heartbeat_seconds:g}s)."
    )
    print("To enrol it again: `kubegate agents join-token --connection NAME --name " + args.name + "`.")
    return 0


@hookimpl
def kubegate_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_commands(subparsers)
