"""OIDC through the real gateway: real kubectl presents a JWT minted by a local IdP (JWKS + discovery over
loopback), the sandbox API server sees the mapped, prefixed identity as impersonation, never the JWT."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl
from oidc_idp import EC_KEY, IdP

AUDIENCE = "kubegate-e2e"
GHA_AUDIENCE = "https://kubegate.example.com"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    server = IdP(AUDIENCE)
    yield server
    server.close()


@pytest.fixture(scope="module")
def oidc_gateway(sandbox, idp: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gateway-oidc")
    config = gateway_config(sandbox, directory, free_port())
    config["connections"]["sandbox"]["plugins"]["oidc"] = {
        "issuers": [
            {"issuer": idp.url, "audiences": [AUDIENCE], "keep_claims": ["email"]},
            {
                # A GitHub Enterprise Server-style issuer: the preset with its issuer overridden.
                "issuer": f"{idp.url}/gha",
                "github_actions": {
                    "audience": GHA_AUDIENCE,
                    "rules": [
                        {"match": {"repository_id": 4242, "environment": "prod"}, "groups": ["deployers"]},
                    ],
                },
                "claim_mappings": {"username": {"prefix": "github:"}},
            },
        ]
    }
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def test_kubectl_with_an_oidc_token_arrives_as_the_mapped_identity(oidc_gateway, sandbox, idp):
    token = idp.mint(EC_KEY, "ES256", groups=["dev", "ops"], email="alice@example.com")
    since = last_id(sandbox)
    proc = run_kubectl(oidc_gateway.kubeconfig("oidc-alice", token=token), "auth", "whoami", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["status"]["userInfo"]
    assert info["username"] == f"{idp.url}#alice"
    assert {"oidc:dev", "oidc:ops"} <= set(info["groups"])
    run_kubectl(oidc_gateway.kubeconfig("oidc-alice", token=token), "get", "pods", "-n", "prod", check=True)
    records = sandbox.requests_log(since)
    assert records
    for record in records:
        assert record["impersonate_user"] == f"{idp.url}#alice"
        assert sorted(record["impersonate_groups"]) == ["oidc:dev", "oidc:ops"]
        assert record["authorization_sha256"] == sha(sandbox.token)
        assert sha(token) not in json.dumps(record)
    assert token not in oidc_gateway.log.read_text()


def test_static_tokens_still_work_beside_oidc(oidc_gateway):
    proc = run_kubectl(oidc_gateway.kubeconfig("bob"), "auth", "whoami", "-o", "json", check=True)
    assert json.loads(proc.stdout)["status"]["userInfo"]["username"] == "bob"


def test_expired_token_is_unauthorized_with_the_reason(oidc_gateway, sandbox, idp):
    now = int(time.time())
    token = idp.mint(exp=now - 3600, iat=now - 7200)
    since = last_id(sandbox)
    proc = run_kubectl(oidc_gateway.kubeconfig("oidc-expired", token=token), "get", "pods", "-n", "prod")
    assert proc.returncode == 1
    assert "Unauthorized" in proc.stderr
    ctx = ssl.create_default_context(cafile=str(oidc_gateway.ca_file))
    request = urllib.request.Request(
        f"{oidc_gateway.connection_url('sandbox')}/api/v1/namespaces/prod/pods",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, context=ctx, timeout=30)
    assert caught.value.code == 401
    status = json.loads(caught.value.read())
    assert status["message"] == "Unauthorized: token expired"
    assert sandbox.requests_log(since) == []
    assert token not in oidc_gateway.log.read_text()


def test_system_group_claim_is_refused(oidc_gateway, idp):
    token = idp.mint(groups=["system:masters"])
    proc = run_kubectl(oidc_gateway.kubeconfig("oidc-sys", token=token), "auth", "whoami")
    assert proc.returncode == 1
    assert "Unauthorized" in proc.stderr


def test_github_actions_token_maps_groups_by_rule(oidc_gateway, sandbox, idp):
    claims = {
        "iss": f"{idp.url}/gha",
        "aud": GHA_AUDIENCE,
        "sub": "repo:acme/web:environment:prod",
        "repository": "acme/web",
        "repository_id": "4242",
        "repository_owner": "acme",
        "repository_owner_id": "99",
        "ref": "refs/heads/main",
        "environment": "prod",
        "job_workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/heads/main",
    }
    token = idp.mint(**claims)
    since = last_id(sandbox)
    proc = run_kubectl(oidc_gateway.kubeconfig("gha", token=token), "auth", "whoami", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["status"]["userInfo"]
    assert info["username"] == "github:repo:acme/web:environment:prod"
    assert {"github-actions", "deployers"} <= set(info["groups"])
    records = sandbox.requests_log(since)
    assert records and all(sha(token) not in json.dumps(r) for r in records)
    # another repository (different id) is authenticated but gets no rule groups
    other = idp.mint(**{**claims, "repository_id": "5555", "sub": "repo:evil/web:environment:prod"})
    proc = run_kubectl(oidc_gateway.kubeconfig("gha-other", token=other), "auth", "whoami", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["status"]["userInfo"]["groups"]
    assert "github-actions" in groups and "deployers" not in groups
