"""A third-party plugin, installed through the `kubegate` entry-point group, enabled on one connection only.

The plugin (tests/plugins_fixture/kubegate_testplugin.py) implements the request hooks; these tests drive
it with real kubectl and check that each hook took effect where enabled and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import GATEWAY_USERS, PLUGIN_FIXTURE
from kubetest import run_kubectl

ALICE = GATEWAY_USERS["alice"][1]


def request(gateway, path: str, *, token: str | None = ALICE, headers=None, method="GET", data=None):
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    req = urllib.request.Request(
        f"{gateway.url}{path}", method=method, data=data, headers=dict(headers or {})
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def audit_records(gateway) -> list[dict]:
    path = gateway.dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_plugins_command_lists_the_entry_point_plugin(gateway):
    env = {**os.environ, "PYTHONPATH": str(PLUGIN_FIXTURE)}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kubegate"), "plugins", "--config", str(gateway.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("testplugin", 1)[1]
    assert "entry point (kubegate-testplugin)" in block.splitlines()[0]
    assert "enabled on: guarded" in block


def test_guardrail_denial_is_printed_by_kubectl_only_where_enabled(gateway):
    proc = run_kubectl(gateway.kubeconfig("alice", connection="guarded"), "delete", "namespace", "dev")
    assert proc.returncode == 1
    assert "Error from server (Forbidden): namespaces cannot be deleted through this gateway" in proc.stderr
    # The same user on a connection without the plugin reaches the cluster (dry run: nothing is deleted).
    proc = run_kubectl(gateway.kubeconfig("alice"), "delete", "namespace", "dev", "--dry-run=server")
    assert proc.returncode == 0, proc.stderr


def test_a_crashing_decision_plugin_denies(gateway, sandbox):
    status, _, body = request(
        gateway, "/k8s/guarded/api/v1/namespaces/prod/pods", headers={"X-Test-Explode": "1"}
    )
    assert status == 403
    assert "policy plugin failed" in json.loads(body)["message"]


def test_a_plugin_smuggling_an_impersonation_header_is_refused(gateway, sandbox):
    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    status, _, body = request(
        gateway, "/k8s/guarded/api/v1/namespaces/prod/pods", headers={"X-Test-Smuggle": "1"}
    )
    assert status == 500
    assert "Impersonate-Group" in json.loads(body)["message"]
    assert sandbox.requests_log(since) == []


@pytest.mark.needs_pods
def test_response_header_and_body_hooks(gateway):
    status, headers, body = request(gateway, "/k8s/guarded/api/v1/namespaces/prod/pods/web/log?tailLines=1")
    assert status == 200 and headers.get("X-Kubegate-Test") == "on"
    assert b"postgres://" in body  # not transformed unless asked
    status, headers, body = request(
        gateway, "/k8s/guarded/api/v1/namespaces/prod/pods/web/log?tailLines=1", headers={"X-Test-Upper": "1"}
    )
    assert status == 200 and b"POSTGRES://" in body
    assert "Content-Length" not in headers  # a transformer may change the length
    status, headers, _ = request(gateway, "/k8s/sandbox/api/v1/namespaces/prod/pods/web/log?tailLines=1")
    assert status == 200 and "X-Kubegate-Test" not in headers  # not enabled on `sandbox`


def test_a_plugin_reading_the_body_does_not_lose_it(gateway):
    name = f"read-{uuid.uuid4().hex[:6]}"
    manifest = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}
    )
    status, headers, body = request(
        gateway,
        "/k8s/guarded/api/v1/namespaces/prod/configmaps",
        method="POST",
        data=manifest.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 201, body
    assert headers["X-Kubegate-Body-Bytes"] == str(len(manifest))
    assert json.loads(body)["data"] == {"k": "v"}


@pytest.mark.needs_pods
def test_exec_frames_pass_through_the_frame_hook(gateway):
    guarded = gateway.kubeconfig("alice", connection="guarded")
    proc = run_kubectl(guarded, "exec", "web", "-n", "prod", "--", "echo", "my secret", check=True)
    assert proc.stdout == "my ******\n"
    plain = run_kubectl(gateway.kubeconfig("alice"), "exec", "web", "-n", "prod", "--", "echo", "my secret")
    assert plain.stdout == "my secret\n"


@pytest.mark.needs_pods
def test_audit_events_reach_the_sink_with_fingerprints_not_tokens(gateway):
    guarded = gateway.kubeconfig("alice", connection="guarded")
    run_kubectl(guarded, "get", "pods", "-n", "prod", check=True)
    bad_token = "definitely-not-valid-" + uuid.uuid4().hex
    status, _, _ = request(gateway, "/k8s/guarded/api/v1/namespaces/prod/pods", token=bad_token)
    assert status == 401
    run_kubectl(guarded, "exec", "web", "-n", "prod", "--", "true", check=True)
    records = audit_records(gateway)
    gets = [r for r in records if r["kind"] == "request" and r["attributes"]["verb"] == "list"]
    assert any(
        r["identity"]["user"] == "alice" and r["status"] == 200 and r["kubectl_command"] == "kubectl get"
        for r in gets
    )
    failures = [r for r in records if r.get("auth_failure")]
    assert any(
        r["credential"] == "sha256:" + hashlib.sha256(bad_token.encode()).hexdigest() for r in failures
    )
    assert bad_token not in json.dumps(records)
    kinds = {r["kind"] for r in records}
    assert {"session_start", "session_end"} <= kinds
    assert all(r["connection"] == "guarded" for r in records)
