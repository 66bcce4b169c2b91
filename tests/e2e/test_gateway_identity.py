"""Identity through the gateway: the caller arrives as impersonation, the caller's credential never arrives,
and nothing unauthenticated reaches the API server."""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import CI_BOT_UID, GATEWAY_USERS
from kubetest import run_kubectl


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def gateway_get(gateway, path: str, token: str | None = None, method: str = "GET", headers=None, data=None):
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    request = urllib.request.Request(
        f"{gateway.url}{path}", method=method, data=data, headers=dict(headers or {})
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_caller_arrives_as_impersonation_and_its_token_never_arrives(gateway, sandbox):
    since = last_id(sandbox)
    run_kubectl(gateway.kubeconfig("ci-bot"), "get", "pods", "-n", "prod", check=True)
    records = sandbox.requests_log(since)
    assert records, "the sandbox saw nothing"
    caller_token = sha(GATEWAY_USERS["ci-bot"][1])
    for record in records:
        assert record["impersonate_user"] == "ci-bot"
        assert sorted(record["impersonate_groups"]) == ["ci", "deployers"]
        assert record["impersonate_uid"] == CI_BOT_UID
        assert record["authorization_sha256"] == sha(sandbox.token)
        assert caller_token not in json.dumps(record)


def test_client_impersonation_headers_are_stripped(gateway, sandbox):
    """kubectl --as/--as-group sends Impersonate-* headers: they must not let alice become anyone else."""
    since = last_id(sandbox)
    proc = run_kubectl(
        gateway.kubeconfig("alice"),
        "get", "pods", "-n", "prod", "--as", "admin", "--as-group", "system:masters", "--as-uid", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = sandbox.requests_log(since)
    assert records
    for record in records:
        assert record["impersonate_user"] == "alice"
        assert record["impersonate_groups"] == ["developers"]
        assert not record["impersonate_uid"]
        assert "system:masters" not in json.dumps(record)


def test_whoami_through_the_gateway(gateway):
    proc = run_kubectl(gateway.kubeconfig("bob"), "auth", "whoami", "-o", "json", check=True)
    info = json.loads(proc.stdout)["status"]["userInfo"]
    assert info["username"] == "bob"
    assert "readonly" in info["groups"]


def test_cluster_rbac_applies_to_the_impersonated_user(gateway):
    proc = run_kubectl(gateway.kubeconfig("bob"), "delete", "pod", "web", "-n", "prod")
    assert proc.returncode == 1
    assert "Error from server (Forbidden)" in proc.stderr
    assert 'User "bob" cannot delete resource "pods"' in proc.stderr


def test_exec_denied_by_the_cluster_prints_the_api_servers_message(gateway):
    """A refused WebSocket upgrade is relayed with the API server's own Status (kubectl then retries over
    SPDY, which gets the same answer)."""
    proc = run_kubectl(gateway.kubeconfig("bob"), "exec", "web", "-n", "prod", "--", "true")
    assert proc.returncode == 1
    assert 'pods "web" is forbidden: User "bob" cannot create resource "pods/exec"' in proc.stderr


def test_a_refused_websocket_upgrade_carries_the_api_servers_status(gateway):
    """The WebSocket attempt itself (not kubectl's SPDY retry) gets the API server's refusal as it was: the
    handshake's trace that keeps it lives on a sibling session of the connection's pool (core/relay.py)."""
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol": "v5.channel.k8s.io",
    }
    path = "/k8s/sandbox/api/v1/namespaces/prod/pods/web/exec?command=true&stdout=true"
    # http.client sends the headers as given (urllib would replace Connection with "close": no upgrade)
    url = urllib.parse.urlsplit(gateway.url)
    conn = http.client.HTTPSConnection(
        url.hostname, url.port, context=ssl.create_default_context(cafile=str(gateway.ca_file)), timeout=30
    )
    try:
        conn.request("GET", path, headers={**headers, "Authorization": f"Bearer {GATEWAY_USERS['bob'][1]}"})
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 403, body
    status_object = json.loads(body)
    assert status_object["kind"] == "Status" and status_object["reason"] == "Forbidden"
    assert 'User "bob" cannot create resource "pods/exec"' in status_object["message"]


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_unauthenticated_requests_never_reach_upstream(gateway, sandbox, token):
    since = last_id(sandbox)
    status, body = gateway_get(gateway, "/k8s/sandbox/api/v1/namespaces/prod/pods", token=token)
    assert status == 401
    doc = json.loads(body)
    assert doc["kind"] == "Status" and doc["reason"] == "Unauthorized" and doc["code"] == 401
    assert sandbox.requests_log(since) == []


def test_kubectl_with_a_bad_token_prints_unauthorized(gateway):
    proc = run_kubectl(gateway.kubeconfig("alice", token="not-a-token"), "get", "pods")
    assert proc.returncode == 1
    assert "Unauthorized" in proc.stderr
