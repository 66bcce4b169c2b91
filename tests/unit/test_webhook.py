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
