"""Guardrails and approvals end to end: real kubectl through the gateway to a sandbox cluster of this
module's own (these tests delete pods), reviewers acting through the JSON API and `kubegate approvals`."""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    VENV_BIN,
    Gateway,
    Sandbox,
    free_port,
    gateway_config,
    start_gateway,
    start_sandbox,
    stop_process,
)
from kubetest import gateway_api, run_kubectl

KUBEGATE = str(VENV_BIN / "kubegate")
KUBECTL = str(VENV_BIN / "kubectl")
PEOPLE = {
    # user: (groups, token)
    "rita": (["reviewers"], "rita-token-0123456789abcdef"),
    "ray": (["reviewers"], "ray-token-0123456789abcdef"),
    "sam": (["reviewers", "developers"], "sam-token-0123456789abcdef"),
}
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "trial-no-configmap-reads", "match": {"verbs": ["get", "list"], "resources": ["configmaps"]},
         "action": "deny", "dry_run": True},
        {"name": "bots-never-delete-in-prod", "match": {"groups": ["ci"], "verbs": ["delete", "deletecollection"],
                                                         "namespaces": ["prod"]},
         "action": "deny", "message": "CI may not delete anything in prod; ask a human"},
        {"name": "prod-pod-deletes", "match": {"verbs": ["delete"], "resources": ["pods"], "namespaces": ["prod"]},
         "action": "approve", "message": "deleting pods in prod needs a reviewer",
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 120}},
        {"name": "two-person-secrets", "match": {"verbs": ["delete"], "resources": ["secrets"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"], "min_approvals": 2}},
        {"name": "short-wait", "match": {"verbs": ["delete"], "resources": ["configmaps"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 10}},
        {"name": "secret-writes", "match": {"verbs": ["create"], "resources": ["secrets"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
        {"name": "prod-deployment-patches", "match": {"verbs": ["patch"], "resources": ["deployments"],
                                                       "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
        {"name": "prod-exec", "match": {"resources": ["pods/exec"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"], "scope": "window", "window_seconds": 600}},
    ],
}  # fmt: skip


class Receiver:
    """Webhook receivers on loopback: /json records, /slack records and then blocks until `gate` is set
    (a receiver that does not answer), /flaky fails twice before it accepts."""

    def __init__(self) -> None:
        self.posts: dict[str, list[dict]] = {"/json": [], "/slack": [], "/flaky": []}
        self.flaky_failures = 0
        self.gate = threading.Event()
        self.gate.set()  # /slack answers at once until a test closes the gate
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 200
                if self.path == "/flaky" and receiver.flaky_failures < 2:
                    receiver.flaky_failures += 1
                    status = 500
                else:
                    receiver.posts[self.path].append(body)
                if self.path == "/slack":
                    receiver.gate.wait(60)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def own_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox-approvals"))
    yield sandbox
    stop_process(sandbox.process)


def approvals_config(sandbox: Sandbox, directory: Path, receiver: Receiver | None = None) -> dict[str, Any]:
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    for user, (groups, token) in PEOPLE.items():
        plugins["static-tokens"]["tokens"].append(
            {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        )
    plugins["policy"] = POLICY
    plugins["approvals"] = {}
    plugins["testplugin"] = {"audit_file": str(directory / "audit.jsonl")}
    if receiver is not None:
        plugins["webhook"] = {"receivers": [
            {"url": f"{receiver.url}/json"},
            {"url": f"{receiver.url}/slack", "format": "slack", "link_url": "https://kubegate.example.com"},
            {"url": f"{receiver.url}/flaky", "events": ["approval.requested"]},
        ]}  # fmt: skip
    return config


@pytest.fixture(scope="module")
def gw(own_sandbox, receiver, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-approvals")
    gateway = start_gateway(
        directory, approvals_config(own_sandbox, directory, receiver), with_test_plugin=True
    )
    yield gateway
    stop_process(gateway.process)


def api(gw: Gateway, method: str, path: str, user: str, body: dict | None = None) -> tuple[int, Any]:
    return gateway_api(gw, method, path, PEOPLE[user][1], body)


def kubectl(gw: Gateway, user: str, *args: str) -> subprocess.Popen:
    token = PEOPLE[user][1] if user in PEOPLE else None
    return subprocess.Popen(
        [KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig(user, token=token)), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def wait_pending(gw: Gateway, reviewer: str, **expect: Any) -> dict[str, Any]:
    """The pending request matching `expect`, as the reviewer sees it (waits for it to appear)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, answer = api(gw, "GET", "/api/approvals", reviewer)
        assert status == 200, answer
        for item in answer["items"]:
            if all(item.get(k) == v for k, v in expect.items()):
                return item
        time.sleep(0.2)
    raise AssertionError(f"no pending request like {expect}")


def audit(gw: Gateway, approval_id: str) -> list[str]:
    lines = [json.loads(line) for line in (gw.dir / "audit.jsonl").read_text().splitlines()]
    return [
        e["kind"]
        for e in lines
        if e.get("approval_id") == approval_id or (e.get("approval") or {}).get("approval_id") == approval_id
    ]


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_delete_is_held_until_a_reviewer_approves_then_kubectl_completes(gw, own_sandbox):
    held = kubectl(gw, "alice", "delete", "pod", "worker", "-n", "prod")
    item = wait_pending(gw, "rita", name="worker")
    assert item["requester"] == "alice" and item["requester_groups"] == ["developers"]
    assert (item["verb"], item["resource"], item["namespace"]) == ("delete", "pods", "prod")
    assert item["rule"] == "prod-pod-deletes" and item["reason"] == "deleting pods in prod needs a reviewer"
    assert item["kubectl_command"] == "kubectl delete"
    time.sleep(1)
    assert held.poll() is None  # still waiting
    review = subprocess.run(
        [KUBEGATE, "approvals", "approve", item["id"], "-m", "go ahead", "--token", PEOPLE["rita"][1],
         "--gateway", gw.url, "--connection", "sandbox", "--certificate-authority", str(gw.ca_file)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert review.returncode == 0 and f"{item['id']}: approved" in review.stdout, review.stderr
    code, out, err = finish(held)
    assert code == 0, err
    assert 'pod "worker" deleted' in out
    gone = run_kubectl(own_sandbox.kubeconfig, "get", "pod", "worker", "-n", "prod")
    assert gone.returncode == 1 and "NotFound" in gone.stderr
    kinds = audit(gw, item["id"])
    assert {"approval.requested", "approval.approved", "approval.used"} <= set(kinds), kinds


def test_denial_reaches_kubectl_with_the_reviewers_reason(gw, own_sandbox):
    held = kubectl(gw, "alice", "delete", "pod", "web-0", "-n", "prod")
    item = wait_pending(gw, "rita", name="web-0")
    status, answer = api(
        gw, "POST", f"/api/approvals/{item['id']}/deny", "rita", {"comment": "not during the freeze"}
    )
    assert status == 200 and answer["state"] == "denied"
    code, _, err = finish(held)
    assert code == 1
    assert "Error from server (Forbidden): denied by rita: not during the freeze" in err
    run_kubectl(own_sandbox.kubeconfig, "get", "pod", "web-0", "-n", "prod", check=True)  # still there
    assert "approval.denied" in audit(gw, item["id"])


def test_unreviewed_request_expires(gw):
    held = kubectl(gw, "alice", "delete", "configmap", "settings", "-n", "prod")
    item = wait_pending(gw, "rita", resource="configmaps")
    code, _, err = finish(held, timeout=40)
    assert code == 1 and f"approval expired: nobody approved request {item['id']} in time" in err
    assert api(gw, "GET", f"/api/approvals/{item['id']}", "rita")[1]["state"] == "expired"
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})
    assert status == 409 and "expired" in answer["error"]


def test_ci_identity_hits_the_guardrail_at_once(gw):
    start = time.monotonic()
    code, _, err = finish(kubectl(gw, "ci-bot", "delete", "pod", "web", "-n", "prod"))
    assert code == 1
    assert "Error from server (Forbidden): CI may not delete anything in prod; ask a human" in err
    assert time.monotonic() - start < 20  # not held


def test_no_self_approval_and_only_reviewers(gw):
    held = kubectl(gw, "sam", "delete", "pod", "ghost-1", "-n", "prod")
    item = wait_pending(gw, "rita", name="ghost-1", requester="sam")
    assert api(gw, "POST", f"/api/approvals/{item['id']}/approve", "sam", {}) == (
        403, {"error": "you cannot review your own request"})  # fmt: skip
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", "ray", {"comment": "ok"})
    assert status == 200 and answer["state"] == "approved"
    code, _, err = finish(held)
    assert code == 1 and 'pods "ghost-1" not found' in err  # it went upstream: the API server answered


def test_not_a_reviewer_cannot_see_or_approve(gw):
    held = kubectl(gw, "alice", "delete", "pod", "ghost-2", "-n", "prod")
    item = wait_pending(gw, "rita", name="ghost-2")
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    request = urllib.request.Request(f"{gw.url}/api/approvals/{item['id']}/approve", data=b"{}", method="POST",
                                     headers={"Authorization": "Bearer bob-token-0123456789abcdef"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert caught.value.code == 404  # bob is neither reviewer nor requester: he does not see it
    request = urllib.request.Request(f"{gw.url}/api/approvals", headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert caught.value.code == 401
    api(gw, "POST", f"/api/approvals/{item['id']}/deny", "rita", {"comment": "cleanup"})
    finish(held)


def test_two_distinct_reviewers_are_needed_when_the_rule_says_so(gw, own_sandbox):
    # (not db-credentials: the pod `web` reads it, and the exec test needs web)
    run_kubectl(own_sandbox.kubeconfig, "create", "secret", "generic", "throwaway", "-n", "prod",
                "--from-literal=k=v", check=True)  # fmt: skip
    held = kubectl(gw, "alice", "delete", "secret", "throwaway", "-n", "prod")
    item = wait_pending(gw, "rita", resource="secrets")
    assert item["min_approvals"] == 2
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})
    assert status == 200 and answer["state"] == "pending" and len(answer["approvals"]) == 1
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})
    assert status == 409 and "another reviewer" in answer["error"]
    time.sleep(1)
    assert held.poll() is None
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", "ray", {})
    assert status == 200 and answer["state"] == "approved"
    code, out, err = finish(held)
    assert code == 0 and 'secret "throwaway" deleted' in out, err


def test_an_approval_binds_the_exact_intent_and_survives_the_client_leaving(gw):
    first = kubectl(gw, "alice", "delete", "pod", "ghost-a", "-n", "prod")
    item = wait_pending(gw, "rita", name="ghost-a")
    first.send_signal(signal.SIGINT)  # the developer gives up waiting
    try:
        first.wait(10)
    except subprocess.TimeoutExpired:  # kubectl was slow to act on it (seen once on a loaded machine):
        first.kill()  # the client leaves all the same
        first.wait(10)
    time.sleep(0.5)
    assert api(gw, "GET", f"/api/approvals/{item['id']}", "rita")[1]["state"] == "pending"  # kept
    assert api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})[1]["state"] == "approved"
    # Another name, or another namespace: not covered by that approval — held as a new request.
    for args, expect in [(("ghost-b", "-n", "prod"), {"name": "ghost-b"}),
                         (("ghost-a", "-n", "prod", "--grace-period=5"), {"name": "ghost-a", "state": "pending"})]:  # fmt: skip
        other = kubectl(gw, "alice", "delete", "pod", *args)
        other_item = wait_pending(gw, "rita", **expect)
        assert other_item["id"] != item["id"]
        api(gw, "POST", f"/api/approvals/{other_item['id']}/deny", "rita", {"comment": "no"})
        finish(other)
    # The same intent again: proceeds on the approval given while nobody waited — once.
    code, _, err = finish(kubectl(gw, "alice", "delete", "pod", "ghost-a", "-n", "prod"))
    assert code == 1 and 'pods "ghost-a" not found' in err  # reached the API server
    assert api(gw, "GET", f"/api/approvals/{item['id']}", "rita")[1]["state"] == "used"
    again = kubectl(gw, "alice", "delete", "pod", "ghost-a", "-n", "prod")
    again_item = wait_pending(gw, "rita", name="ghost-a")
    assert again_item["id"] != item["id"]
    api(gw, "POST", f"/api/approvals/{again_item['id']}/deny", "rita", {})
    finish(again)


def test_exec_is_held_before_the_upgrade_and_a_window_grant_covers_the_next_ones(gw):
    held = kubectl(gw, "alice", "exec", "web", "-n", "prod", "--", "echo", "hello")
    item = wait_pending(gw, "rita", resource="pods/exec")
    assert item["command"] == ["echo", "hello"] and item["scope"] == "window"
    assert api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})[0] == 200
    code, out, err = finish(held)
    assert code == 0 and out == "hello\n", err
    # Within the window: no new approval.
    code, out, _ = finish(kubectl(gw, "alice", "exec", "web", "-n", "prod", "--", "echo", "again"))
    assert code == 0 and out == "again\n"
    listing = subprocess.run(
        [KUBEGATE, "grants", "list", "-c", str(gw.config)], capture_output=True, text=True
    )
    line = next(line for line in listing.stdout.splitlines() if "prod-exec" in line and "alice" in line)
    grant_id = line.split()[0]
    assert "grant.used" in [json.loads(x)["kind"] for x in (gw.dir / "audit.jsonl").read_text().splitlines()]
    revoke = subprocess.run(
        [KUBEGATE, "grants", "revoke", grant_id, "-c", str(gw.config)], capture_output=True, text=True
    )
    assert revoke.returncode == 0 and f"revoked grant {grant_id}" in revoke.stdout
    after = kubectl(gw, "alice", "exec", "web", "-n", "prod", "--", "echo", "third")
    third = wait_pending(gw, "rita", resource="pods/exec", command=["echo", "third"])
    api(gw, "POST", f"/api/approvals/{third['id']}/deny", "rita", {"comment": "window over"})
    code, _, err = finish(after)
    assert code == 1 and "denied by rita: window over" in err


def test_a_pending_approval_survives_a_gateway_restart(own_sandbox, tmp_path):
    directory = tmp_path / "gw"
    config = approvals_config(own_sandbox, directory)
    first = start_gateway(directory, config, with_test_plugin=True)
    held = kubectl(first, "alice", "delete", "pod", "ghost-r", "-n", "prod")
    item = wait_pending(first, "rita", name="ghost-r")
    stop_process(first.process)
    finish(held)
    second = start_gateway(directory, config, with_test_plugin=True)
    try:
        assert api(second, "GET", f"/api/approvals/{item['id']}", "rita")[1]["state"] == "pending"
        assert (
            api(second, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})[1]["state"] == "approved"
        )
        code, _, err = finish(kubectl(second, "alice", "delete", "pod", "ghost-r", "-n", "prod"))
        assert code == 1 and 'pods "ghost-r" not found' in err
    finally:
        stop_process(second.process)


def test_reviewers_are_notified_and_a_stuck_receiver_blocks_nobody(gw, receiver):
    receiver.gate.clear()  # /slack takes requests and does not answer until the end of this test
    receiver.flaky_failures = 0  # /flaky fails the next two posts: this test's request
    held = kubectl(gw, "alice", "delete", "pod", "ghost-n", "-n", "prod")
    item = wait_pending(gw, "rita", name="ghost-n")

    def posted(path: str, kind: str) -> list[dict]:
        if path == "/slack":
            return [p for p in receiver.posts[path] if item["id"] in p["text"]]
        return [p for p in receiver.posts[path] if p.get("kind", kind) == kind
                and p.get("data", {}).get("approval_id") == item["id"]]  # fmt: skip

    deadline = time.monotonic() + 20
    while (
        not (posted("/json", "approval.requested") and posted("/slack", "")) and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    (event,) = posted("/json", "approval.requested")
    assert event["connection"] == "sandbox"
    assert {
        "requester": "alice",
        "verb": "delete",
        "name": "ghost-n",
        "rule": "prod-pod-deletes",
    }.items() <= event["data"].items()
    (message,) = posted("/slack", "")
    assert "*alice* asks to delete pods ghost-n in prod on *sandbox*" in message["text"]
    assert f"<https://kubegate.example.com/api/approvals/{item['id']}|Review {item['id']}>" in message["text"]
    # The slack receiver is still stuck on that message; approving and the held kubectl go on regardless.
    assert api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})[0] == 200
    code, _, err = finish(held)
    assert code == 1 and 'pods "ghost-n" not found' in err
    assert not receiver.gate.is_set()
    receiver.gate.set()
    # The flaky receiver got it on the third try; the delivery is audited.
    deadline = time.monotonic() + 20
    while (
        not [p for p in receiver.posts["/flaky"] if p["data"].get("approval_id") == item["id"]]
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    deadline, sent = time.monotonic() + 10, []
    while {e["url"].rsplit("/", 1)[1] for e in sent} < {"json", "flaky"} and time.monotonic() < deadline:
        events = [json.loads(x) for x in (gw.dir / "audit.jsonl").read_text().splitlines()]
        sent = [e for e in events if e["kind"] == "notification.sent" and e.get("approval_id") == item["id"]]
        time.sleep(0.1)
    assert {e["url"].rsplit("/", 1)[1] for e in sent} >= {"json", "flaky"}
    assert any(e["url"].endswith("/flaky") and e["attempts"] == 3 for e in sent)


def test_two_replicas_on_postgresql_share_approvals(own_sandbox, postgres, tmp_path):
    url = postgres.create_database("replicas")
    replicas = []
    try:
        for name in ("a", "b"):  # one after the other: tables are created by the first
            directory = tmp_path / name
            config = approvals_config(own_sandbox, directory)
            config["database"] = {"url": url}
            replicas.append(start_gateway(directory, config, with_test_plugin=True))
        a, b = replicas
        held = kubectl(a, "alice", "delete", "pod", "ghost-pg", "-n", "prod")
        item = wait_pending(b, "rita", name="ghost-pg")  # held on A, seen through B
        assert api(b, "POST", f"/api/approvals/{item['id']}/approve", "ray", {})[1]["state"] == "approved"
        code, _, err = finish(held)  # released on A by an approval given on B
        assert code == 1 and 'pods "ghost-pg" not found' in err
        assert api(a, "GET", f"/api/approvals/{item['id']}", "rita")[1]["state"] == "used"
    finally:
        for replica in replicas:
            stop_process(replica.process)


def test_a_dry_run_rule_only_audits_what_it_would_have_done(gw):
    code, _, err = finish(kubectl(gw, "alice", "get", "configmaps", "-n", "prod"))
    assert code == 0, err
    # The request's audit event is written once the response is sent: wait for it.
    deadline, found = time.monotonic() + 10, []
    while not found and time.monotonic() < deadline:
        events = [json.loads(x) for x in (gw.dir / "audit.jsonl").read_text().splitlines()]
        found = [
            e for e in events if e["kind"] == "request" and e["path"] == "/api/v1/namespaces/prod/configmaps"
        ]
        time.sleep(0.1)
    (event,) = found
    assert event["policy"] == {"dry_run": [{"rule": "trial-no-configmap-reads", "action": "deny"}]}
    assert event["status"] == 200


def test_reviewers_see_a_held_body_masked_even_when_kubectl_sent_protobuf(gw):
    held = kubectl(gw, "alice", "create", "secret", "generic", "held-secret", "-n", "prod",
                   "--from-literal=pw=topsecret-value-77")  # fmt: skip
    item = wait_pending(gw, "rita", name="", resource="secrets")
    preview = json.loads(item["body_preview"])  # decoded from protobuf, then masked
    assert preview["kind"] == "Secret" and preview["metadata"]["name"] == "held-secret"
    assert set(preview["data"]) == {"pw"} and "topsecret-value-77" not in item["body_preview"]
    assert "dG9wc2VjcmV0LXZhbHVlLTc3" not in item["body_preview"]  # nor its base64
    api(gw, "POST", f"/api/approvals/{item['id']}/deny", "rita", {"comment": "no"})
    finish(held)


def rollout(sandbox: Sandbox, name: str, **annotations: str) -> None:
    """A Deployment in prod with an app container (hardened) and a sidecar, made past the gateway."""
    manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "prod", "annotations": annotations},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                     {"name": "app", "image": "busybox:1", "command": ["sleep", "3600"],
                      "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}},
                     {"name": "security-agent", "image": "busybox:1", "command": ["sleep", "3600"]}]}}},
    }  # fmt: skip
    run_kubectl(sandbox.kubeconfig, "apply", "-f", "-", input=json.dumps(manifest), check=True)


def containers(sandbox: Sandbox, name: str) -> list[dict[str, Any]]:
    got = run_kubectl(sandbox.kubeconfig, "get", "deployment", name, "-n", "prod", "-o", "json", check=True)
    return json.loads(got.stdout)["spec"]["template"]["spec"]["containers"]


def test_an_approved_strategic_patch_does_not_release_the_same_bytes_as_a_merge_patch(gw, own_sandbox):
    """The same bytes are another change as a JSON merge patch: the container list replaced whole."""
    rollout(own_sandbox, "bump")
    bump = json.dumps(
        {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "busybox:2"}]}}}}
    )
    first = kubectl(gw, "alice", "patch", "deployment", "bump", "-n", "prod", "--type=strategic", "-p", bump)
    item = wait_pending(gw, "rita", name="bump")
    first.kill()  # the developer leaves; the reviewer approves "bump app's image" as shown
    first.wait(10)
    assert api(gw, "POST", f"/api/approvals/{item['id']}/approve", "rita", {})[1]["state"] == "approved"
    # The same bytes as a merge patch: a request of its own, held for review — not released.
    merge = kubectl(gw, "alice", "patch", "deployment", "bump", "-n", "prod", "--type=merge", "-p", bump)
    time.sleep(2)
    assert merge.poll() is None, finish(merge)
    assert [c["name"] for c in containers(own_sandbox, "bump")] == ["app", "security-agent"]
    other = wait_pending(gw, "rita", name="bump", state="pending")
    assert other["id"] != item["id"] and other["media_type"] == "application/merge-patch+json"
    # What the reviewer approved, as shown: the strategic merge patch of those bytes.
    shown = api(gw, "GET", f"/api/approvals/{item['id']}", "rita")[1]
    assert shown["media_type"] == "application/strategic-merge-patch+json"
    assert json.loads(shown["body"]) == json.loads(bump)
    assert "strategic merge patch: lists of known keys are merged by key" in cli(
        gw, "rita", "show", item["id"]
    )
    api(gw, "POST", f"/api/approvals/{other['id']}/deny", "rita", {"comment": "that drops the sidecar"})
    code, _, err = finish(merge)
    assert code == 1 and "denied by rita: that drops the sidecar" in err
    # The approved strategic patch itself still goes through, once.
    code, _, err = finish(kubectl(gw, "alice", "patch", "deployment", "bump", "-n", "prod", "--type=strategic",
                                  "-p", bump))  # fmt: skip
    assert code == 0, err
    assert [(c["name"], c["image"]) for c in containers(own_sandbox, "bump")] == [
        ("app", "busybox:2"), ("security-agent", "busybox:1")]  # fmt: skip


def cli(gw: Gateway, user: str, *args: str) -> str:
    done = subprocess.run(
        [KUBEGATE, "approvals", *args, "--token", PEOPLE[user][1], "--gateway", gw.url, "--connection", "sandbox",
         "--certificate-authority", str(gw.ca_file)], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reviewers_see_the_whole_body_they_approve(gw, own_sandbox):
    """A long, benign note first and the privileged container after it: reviewers see all of it (they were
    shown its first 1024 characters, 300 in `kubegate approvals show`, cut without a mark)."""
    rollout(own_sandbox, "noted")
    note = "Routine image bump requested in ticket OPS-1234, reviewed by the team; " * 16
    doc = {"metadata": {"annotations": {"change-note": note}},
           "spec": {"template": {"spec": {"containers": [
               {"name": "app", "image": "busybox:3", "securityContext": {"privileged": True}}]}}}}  # fmt: skip
    held = kubectl(gw, "alice", "patch", "deployment", "noted", "-n", "prod", "-p", json.dumps(doc))
    listed = wait_pending(gw, "rita", name="noted")
    text = cli(gw, "rita", "show", listed["id"])
    assert '"privileged": true' in text and text.count("OPS-1234") == 16, text
    shown = api(gw, "GET", f"/api/approvals/{listed['id']}", "rita")[1]
    assert json.loads(shown["body"]) == doc and shown["body_truncated"] is False
    # A list shows each body's start, and says so.
    assert listed["body_truncated"] is True and "privileged" not in listed["body_preview"]
    api(gw, "POST", f"/api/approvals/{listed['id']}/deny", "rita", {"comment": "no privileged containers"})
    finish(held)
