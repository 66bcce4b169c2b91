"""`kubegate approvals list|show|approve|deny`: the reviewers' CLI over the JSON API, with the token of
`kubegate login` (or --token)."""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from kubegate.core.terminal import escape_controls
from kubegate.plugins.login.client import ClientError, Target, call, read_cached


def token_for(target: Target, token: str | None) -> str:
    if token:
        return token
    cached = read_cached(target)
    if cached is None:
        raise ClientError(
            f"no valid token for {target.gateway} ({target.connection}): run kubegate login, or give --token"
        )
    return str(cached["token"])


def request(target: Target, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    status, answer = call(target, method, path, body, token)
    if status != 200:
        raise ClientError(answer.get("error", f"the gateway answered {status}"))
    return answer


def describe(item: dict[str, Any]) -> list[str]:
    """`kubegate approvals show`: the record, one field per line, every line safe to print."""
    what = f"{item['verb']} {item['resource']}"
    if item.get("name"):
        what += f" {item['name']}"
    if item.get("namespace"):
        what += f" -n {item['namespace']}"
    lines = [
        f"id:         {item['id']}  ({item['state']})",
        f"who:        {item['requester']} (groups: {', '.join(item['requester_groups']) or 'none'}; "
        f"{item['requester_method'] or '-'})",
        f"person:     {item.get('requester_person') or item['requester']}",
        f"what:       {what}" + (f"  command: {shlex.join(item['command'])}" if item.get("command") else ""),
        f"request:    {item['path']}",
    ]
    if item.get("kubectl_command"):
        lines.append(f"kubectl:    {item['kubectl_command']}")
    lines += [
        f"where:      connection {item['connection']}",
        f"why:        rule {item['rule']}" + (f": {item['reason']}" if item.get("reason") else ""),
        f"needs:      {item['min_approvals']} approval(s) from {', '.join(item['reviewer_groups'])}; "
        f"scope {item['scope']}" + (f" ({item['window_seconds']} s)" if item["scope"] == "window" else ""),
        f"waiting:    {max(int(time.time() - item['created_at']), 0)} s, expires in "
        f"{max(int(item['expires_at'] - time.time()), 0)} s",
    ]
    for approval in item.get("approvals") or []:
        person = approval.get("person")
        lines.append(
            f"approved:   by {approval['reviewer']}"
            + (f" (person {person})" if person and person != approval["reviewer"] else "")
            + (f": {approval['comment']}" if approval.get("comment") else "")
        )
    if item.get("denial"):
        lines.append(f"denied:     by {item['denial']['reviewer']}: {item['denial'].get('comment', '')}")
    # What the requester sent (command, path, names, reason) cannot drive the reviewer's terminal: a
    # carriage return and an erase-line sequence in an argv element redrew the `what:` line shown.
    return [escape_controls(line) for line in lines + body_lines(item)]


# What a media type makes of the same bytes: the reviewer approves one reading, not the bytes alone.
READINGS = {
    "application/strategic-merge-patch+json": "strategic merge patch: lists of known keys are merged by key",
    "application/merge-patch+json": "JSON merge patch (RFC 7386): every list given replaces the whole list",
    "application/json-patch+json": "JSON patch (RFC 6902): the operations in order",
    "application/apply-patch+yaml": "server-side apply: the fields this manager owns",
    "application/json": "the whole object, JSON",
    "application/yaml": "the whole object, YAML (shown as JSON)",
    "application/vnd.kubernetes.protobuf": "the whole object, protobuf (shown as JSON)",
}


def body_lines(item: dict[str, Any]) -> list[str]:
    """The request's body as the record keeps it, whole (masked), pretty-printed when it is JSON, with its
    media type; a body the record does not hold whole says so (such records cannot be approved)."""
    lines = []
    media_type = item.get("media_type", "")
    if media_type is None:
        lines.append(
            "body type:  not recorded (held before approvals bound it: this request cannot be approved)"
        )
    elif media_type:
        reading = READINGS.get(media_type)
        lines.append(f"body type:  {media_type}" + (f" ({reading})" if reading else ""))
    body = item.get("body", item.get("body_preview", ""))
    if item.get("body_truncated"):
        lines.append("body:       CUT: only the start below is stored; this request cannot be approved")
    elif "body" not in item and body:
        lines.append("body:       MAY BE CUT: an older gateway shows only the first 1024 characters")
    if body:
        try:
            # ASCII only: a terminal control or bidi character in a value cannot hide or reorder a line
            body = json.dumps(json.loads(body), indent=2)
        except ValueError:
            body = "".join(c if c.isprintable() or c == "\n" else f"\\u{ord(c):04x}" for c in body)
        lines.append("body:")
        lines += ["  " + line for line in body.splitlines()]
    return lines


def table(items: list[dict[str, Any]]) -> list[str]:
    rows = [
        f"{'ID':<11} {'STATE':<9} {'REQUESTER':<24} {'VERB':<8} {'RESOURCE':<16} {'NAMESPACE':<12} {'NAME':<20} RULE"
    ]
    for i in items:
        rows.append(
            f"{i['id']:<11} {i['state']:<9} {i['requester'][:24]:<24} {i['verb']:<8} {i['resource'][:16]:<16} "
            f"{i['namespace'][:12]:<12} {i['name'][:20]:<20} {i['rule']}"
        )
    return [escape_controls(row) for row in rows]
