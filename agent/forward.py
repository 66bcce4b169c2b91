"""What the agent checks on each request the gateway sends through a tunnel channel, and how it answers a
refusal and logs a request (the relay itself, which forwards to the API server, is agent/relay.py).

The agent is the second line of defence: a gateway that is compromised (or wrong) still cannot use the
agent's credential as itself, nor as a ``system:`` identity (``system:masters`` is cluster-admin), because
every request must impersonate a user and no ``system:`` user or group passes unless the agent's own config
allows it. The agent trusts nothing else the gateway says: credentials it sends are dropped.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from multidict import CIMultiDictProxy

from kubegate.core.headers import as_read_upstream

log = logging.getLogger("kubegate.agent")


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def status_response(status: int, reason: str, message: str) -> web.Response:
    """A Kubernetes ``Status`` the gateway passes to kubectl as it is."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": status}  # fmt: skip
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


class RequestLog:
    """One line per forwarded request on the agent's log, and optionally a JSON line in a local file."""

    def __init__(self, audit_path: Path | None, json_lines: bool):
        self.json_lines = json_lines
        self._file: IO[str] | None = audit_path.open("a", encoding="utf-8") if audit_path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.json_lines:
            log.info(json.dumps(record, separators=(",", ":")))
        else:
            groups = ",".join(record.get("groups") or [])
            log.info(
                "%s %s %s user=%s groups=%s -> %s %s",
                record["connection"], record["method"], record["path"], record.get("user", "-"),
                groups or "-", record["status"], record.get("error") or f"{record['ms']} ms",
            )  # fmt: skip
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def check_impersonation(headers: CIMultiDictProxy[str], allow_system: list[str]) -> tuple[str, list[str]]:
    """The user and groups the request impersonates; :class:`Refused` unless exactly one user is named and
    no ``system:`` user or group is outside the allow-list."""
    # Judged as the API server reads them (spaces and tabs around a value dropped), whatever parsed them.
    users = [as_read_upstream(user) for user in headers.getall("Impersonate-User", [])]
    if len(users) != 1 or not users[0].strip():
        raise Refused(403, "Forbidden", "kubegate agent: refusing a request that does not impersonate exactly "
                      "one user (the gateway must name the caller)")  # fmt: skip
    user = users[0]
    groups = [as_read_upstream(group) for group in headers.getall("Impersonate-Group", [])]

    def allowed(name: str) -> bool:
        return not name.startswith("system:") or any(fnmatch.fnmatchcase(name, p) for p in allow_system)

    if not allowed(user):
        raise Refused(403, "Forbidden", f"kubegate agent: refusing to impersonate the system user {user!r} "
                      "(not in allow_system_impersonation)")  # fmt: skip
    for group in groups:
        if not allowed(group):
            raise Refused(403, "Forbidden", f"kubegate agent: refusing to impersonate the system group "
                          f"{group!r} (not in allow_system_impersonation)")  # fmt: skip
    return user, groups
