"""The `webhook` plugin: tell people about audit events — approval requests above all — by HTTP POST.

Per connection, one or more receivers, each with a format: `json` (the event as is) or `slack` (a
Slack-compatible message with a link; Mattermost and Rocket.Chat accept it too). Delivery never blocks a
request: events go into a bounded queue per receiver and a background task posts them, retrying failures
with exponential backoff. A full queue drops the oldest event and says so in the log; every delivery and
every final failure is itself an audit event (`notification.sent` / `notification.failed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kubegate.core.config import WebhookURL
from kubegate.core.flow import AuditEvent
from kubegate.core.plugins import hookimpl

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "webhook"
log = logging.getLogger("kubegate.webhook")


class Receiver(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: WebhookURL = Field(description="https URL (http only on loopback).")
    format: Literal["json", "slack"] = "json"
    events: list[str] = Field(
        default_factory=lambda: [
            "approval.requested",
            "approval.approved",
            "approval.denied",
            "approval.expired",
        ],
        description="Audit event kinds to send (globs, e.g. `approval.*`).",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with every POST (e.g. a bearer).")
    timeout_seconds: float = Field(5.0, gt=0, le=60)
    max_attempts: int = Field(
        6, ge=1, le=20, description="Tries per event, with backoff 1 s, 2 s, 4 s … 60 s."
    )
    queue_size: int = Field(1000, ge=1, le=100_000)
    link_url: str | None = Field(None, description="Base URL of links in messages; default the gateway's.")


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    receivers: list[Receiver] = Field(min_length=1)
    _senders: list[Sender] = PrivateAttr(default_factory=list)


# Slack has no escape for a backtick inside a code span: one of the requester's closes the span, and what
# follows is markup. It becomes U+02CB MODIFIER LETTER GRAVE ACCENT, which looks the same, so that a command
# substitution in backticks still reads as one (a quote in its place would make the command look harmless);
# the exact command is behind the review link.
BACKTICK_STANDIN = "\u02cb"
# Characters that would break the message's lines or reorder what is shown: line breaks (a command or a
# name could start a line that looks like the gateway's own, such as "reason: …"), other controls, and
# bidirectional overrides. Each is shown as an escape.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _slack_text(text: Any, limit: int = 500) -> str:
    """Text a requester, a reviewer or the cluster controls (a command, a name, a namespace, a user name, a
    reason, a comment), as Slack shows it literally, on one line and bounded: `&`, `<` and `>` escaped (so it
    cannot make a link such as `<https://elsewhere|Approve>` or a mention such as `<!channel>`), a backtick
    replaced (it cannot close a code span), controls shown as escapes. For receivers that read the message as
    Markdown (Mattermost, Rocket.Chat) a zero-width space also breaks `@` mentions and `](` links."""
    value = str(text)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    value = _UNSHOWN.sub(_shown, value).replace("`", BACKTICK_STANDIN)
    value = value.replace("@", "@\u200b").replace("](", "]\u200b(")
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(event: AuditEvent, link_base: str) -> dict[str, Any]:
    """A Slack message about `event`: every value from the event goes through `_slack_text`."""
    data = event.data
    what = f"{_slack_text(data.get('verb', '?'))} {_slack_text(data.get('resource', '?'))}"
    if data.get("name"):
        what += f" {_slack_text(data['name'])}"
    if data.get("namespace"):
        what += f" in {_slack_text(data['namespace'])}"
    if data.get("command"):
        what += f" (`{_slack_text(' '.join(map(str, data['command'])), limit=1000)}`)"
    approval_id = str(data.get("approval_id") or "")
    link = f"{link_base.rstrip('/')}/api/approvals/{approval_id}" if approval_id else link_base
    requester, reviewer = _slack_text(data.get("requester", "?")), _slack_text(data.get("reviewer", "?"))
    headline = {
        "approval.requested": f":hourglass: *{requester}* asks to {what} on *{_slack_text(event.connection)}*",
        "approval.approved": f":white_check_mark: approved by {reviewer}: {what}",
        "approval.denied": f":no_entry: denied by {reviewer}: {what}",
        "approval.expired": f":alarm_clock: expired without review: {what}",
    }.get(event.kind, f"{_slack_text(event.kind)}: {what}")
    detail = f"rule `{_slack_text(data.get('rule', ''))}`"
    if data.get("comment"):
        detail += f" — “{_slack_text(data['comment'])}”"
    if data.get("intent"):  # the requester's stated reason (masked when it was recorded)
        detail += f"\nreason: “{_slack_text(data['intent'])}”"
    if not approval_id:
        return _slack_body(f"{headline}\n{detail}")
    # The link's address is the gateway's (its configured base and an id it made), never the caller's.
    return _slack_body(f"{headline}\n{detail}\n<{link}|Review {_slack_text(approval_id)}>")


def _slack_body(text: str) -> dict[str, Any]:
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


class Sender:
    """One receiver of one connection: a bounded queue and the task that drains it."""

    def __init__(self, receiver: Receiver, connection: Connection, link_base: str):
        self.receiver, self.connection, self.link_base = receiver, connection, link_base
        self.queue: asyncio.Queue[AuditEvent] = asyncio.Queue(receiver.queue_size)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def wants(self, event: AuditEvent) -> bool:
        return any(fnmatch.fnmatchcase(event.kind, pattern) for pattern in self.receiver.events)

    def offer(self, event: AuditEvent) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: a stale notification is worth least
            self.dropped += 1
            log.warning(
                "webhook %s: queue full, dropped an event (%d so far)", self.receiver.url, self.dropped
            )
        self.queue.put_nowait(event)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            event = await self.queue.get()
            await self._deliver(event)

    def body(self, event: AuditEvent) -> dict[str, Any]:
        if self.receiver.format == "slack":
            return slack_message(event, self.link_base)
        return {"kind": event.kind, "connection": event.connection, "time": event.time, "data": event.data}

    async def _deliver(self, event: AuditEvent) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.receiver.timeout_seconds)
        error = ""
        for attempt in range(1, self.receiver.max_attempts + 1):
            try:
                async with self._session.post(
                    self.receiver.url, json=self.body(event), headers=self.receiver.headers, timeout=timeout
                ) as response:
                    if response.status < 300:
                        await self._report("notification.sent", event, attempt, "")
                        return
                    error = f"status {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = exc.__class__.__name__
            if attempt < self.receiver.max_attempts:
                await asyncio.sleep(min(2 ** (attempt - 1), 60))
        log.error("webhook %s: giving up on %s after %d attempts: %s", self.receiver.url, event.kind,
                  self.receiver.max_attempts, error)  # fmt: skip
        await self._report("notification.failed", event, self.receiver.max_attempts, error)

    async def _report(self, kind: str, event: AuditEvent, attempts: int, error: str) -> None:
        data = {"event": event.kind, "approval_id": event.data.get("approval_id"), "url": self.receiver.url,
                "attempts": attempts, "error": error}  # fmt: skip
        report = AuditEvent(
            kind=kind, flow_id=event.flow_id, connection=event.connection, time=time.time(), data=data
        )
        with contextlib.suppress(Exception):  # reporting must not break delivery
            await self.connection.hooks.audit_event(report, self.connection)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return WebhookSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    for connection in gateway.connections:
        settings = connection.settings_for(PLUGIN_NAME)
        if isinstance(settings, WebhookSettings):
            settings._senders = [
                Sender(r, connection, r.link_url or gateway.public_url) for r in settings.receivers
            ]


@hookimpl
def kubegate_audit_event(event: AuditEvent, connection: Connection) -> None:
    settings: WebhookSettings = connection.settings_for(PLUGIN_NAME)
    for sender in settings._senders:
        if sender.wants(event):
            sender.offer(event)


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    for connection in gateway.connections:
        settings = connection.settings_for(PLUGIN_NAME)
        if isinstance(settings, WebhookSettings):
            for sender in settings._senders:
                await sender.close()
