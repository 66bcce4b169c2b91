"""One person, one reviewer: a person holding two credentials — a static token and an OIDC token of the same
IdP account — must not approve their own held request with the other one, nor count twice toward
`min_approvals`. A real gateway (static tokens, OIDC JWTs minted here against a JWKS served by this test,
`people` mapping the static identities and reading the OIDC `email` claim) in front of the sandbox; real
kubectl holds the requests, reviewers act through the JSON API with either credential."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import gateway_api
from oidc_idp import IdP

KUBECTL = str(VENV_BIN / "kubectl")
AUDIENCE = "kubegate-one-person"
STATIC = {
    # user: (groups, token) — alice is a reviewer herself, so only the person rule can stop her.
    "alice": (["developers", "reviewers"], "alice-one-person-token-0123456789"),
    "rita": (["reviewers"], "rita-one-person-token-0123456789"),
    "ray": (["reviewers"], "ray-one-person-token-0123456789"),
}
REVIEWERS = ["reviewers", "oidc:reviewers"]  # the static group and the OIDC one (prefixed)
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "prod-pod-deletes", "match": {"verbs": ["delete"], "resources": ["pods"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": REVIEWERS, "ttl_seconds": 60}},
        {"name": "two-person-secrets", "match": {"verbs": ["delete"], "resources": ["secrets"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": REVIEWERS, "min_approvals": 2, "ttl_seconds": 60}},
    ],
}  # fmt: skip


def mint(idp: IdP, sub: str, email: str | None = None, **claims: Any) -> str:
    """An OIDC token of `sub` in the IdP's `reviewers` group (email None: the claim left out)."""
    return idp.mint(sub=sub, email=email, groups=["reviewers"], **claims)


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    server = IdP(AUDIENCE)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(sandbox, idp: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-one-person")
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    plugins["static-tokens"]["tokens"] = [
        {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for user, (groups, token) in STATIC.items()
    ]
    plugins["oidc"] = {"issuers": [{"issuer": idp.url, "audiences": [AUDIENCE], "jwks_url": f"{idp.url}/jwks",
                                    "keep_claims": ["email", "email_verified"]}]}  # fmt: skip
    plugins["policy"] = POLICY
    plugins["approvals"] = {}
    plugins["testplugin"] = {"audit_file": str(directory / "audit.jsonl")}
    config["people"] = {
        "claims": ["email"],
        "map": {f"{user}@example.com": [f"static-tokens:{user}"] for user in STATIC},
        # Fail closed: a token that leaves out the email claim has no person, and may not review.
        "user_fallback": False,
    }
    gateway = start_gateway(directory, config, with_test_plugin=True)
    yield gateway
    stop_process(gateway.process)


def api(gw: Gateway, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, Any]:
    return gateway_api(gw, method, path, token, body)


def kubectl(gw: Gateway, name: str, token: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig(name, token=token)), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def wait_pending(gw: Gateway, **expect: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, answer = api(gw, "GET", "/api/approvals", STATIC["ray"][1])
        assert status == 200, answer
        for item in answer["items"]:
            if all(item.get(k) == v for k, v in expect.items()):
                return item
        time.sleep(0.2)
    raise AssertionError(f"no pending request like {expect}")


def audit(gw: Gateway, approval_id: str, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (gw.dir / "audit.jsonl").read_text().splitlines()]
    return [e for e in lines if e["kind"] == kind and e.get("approval_id") == approval_id]


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# The same IdP account as alice's static token, its email as the IdP spells it: keys ignore case.
ALICE_EMAILS = ["alice@example.com", "ALICE@Example.COM"]


@pytest.mark.parametrize("email", ALICE_EMAILS)
def test_the_requesters_oidc_identity_cannot_approve_her_static_identitys_request(gw, idp, email):
    name = f"ghost-one-{ALICE_EMAILS.index(email)}"
    held = kubectl(gw, "alice", STATIC["alice"][1], "delete", "pod", name, "-n", "prod")
    item = wait_pending(gw, name=name)
    other_alice = mint(idp, "alice", email)
    for action in ("approve", "deny"):
        status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/{action}", other_alice, {})
        assert status == 403, answer
        assert (
            answer["error"].startswith("you cannot review your own request")
            and "alice@example.com" in answer["error"]
        )
    assert item["requester"] == "alice" and item["requester_person"] == "alice@example.com"
    time.sleep(0.5)
    assert held.poll() is None  # still held
    assert api(gw, "GET", f"/api/approvals/{item['id']}", STATIC["ray"][1])[1]["state"] == "pending"
    # Another person may.
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", STATIC["ray"][1], {})
    assert status == 200 and answer["state"] == "approved"
    assert [(a["reviewer"], a["person"]) for a in answer["approvals"]] == [("ray", "ray@example.com")]
    code, _, err = finish(held)
    assert code == 1 and f'pods "{name}" not found' in err  # released: the API server answered
    (event,) = audit(gw, item["id"], "approval.approved")
    assert event["reviewer_person"] == "ray@example.com" and event["requester_person"] == "alice@example.com"


def test_the_requesters_static_identity_cannot_approve_her_oidc_identitys_request(gw, idp):
    token = mint(idp, "alice", "alice@example.com")
    held = kubectl(gw, "alice-oidc", token, "delete", "pod", "ghost-two", "-n", "prod")
    item = wait_pending(gw, name="ghost-two")
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", STATIC["alice"][1], {})
    assert status == 403 and "same person, alice@example.com" in answer["error"], answer
    assert item["requester"] == f"{idp.url}#alice" and item["requester_person"] == "alice@example.com"
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", STATIC["rita"][1], {})
    assert status == 200 and answer["state"] == "approved"
    code, _, err = finish(held)
    assert code == 1 and 'pods "ghost-two" not found' in err


def test_two_identities_of_one_reviewer_do_not_make_two_approvals(gw, idp):
    held = kubectl(gw, "alice", STATIC["alice"][1], "delete", "secret", "ghost-secret", "-n", "prod")
    item = wait_pending(gw, name="ghost-secret")
    assert item["min_approvals"] == 2
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", STATIC["rita"][1], {})
    assert status == 200 and answer["state"] == "pending"
    rita_oidc = mint(idp, "rita", "Rita@example.com")
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", rita_oidc, {})
    assert status == 409 and "already approved this request as rita" in answer["error"], answer
    time.sleep(0.5)
    assert held.poll() is None
    status, answer = api(gw, "GET", f"/api/approvals/{item['id']}", STATIC["ray"][1])
    assert answer["state"] == "pending" and len(answer["approvals"]) == 1
    # A second person completes it.
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", STATIC["ray"][1], {})
    assert status == 200 and answer["state"] == "approved"
    assert [a["person"] for a in answer["approvals"]] == ["rita@example.com", "ray@example.com"]
    code, _, err = finish(held)
    assert code == 1 and 'secrets "ghost-secret" not found' in err
    (event,) = audit(gw, item["id"], "approval.approved")
    assert [a["person"] for a in event["approvals"]] == ["rita@example.com", "ray@example.com"]


@pytest.mark.parametrize("claims", [{"email": None}, {"email": "alice@example.com", "email_verified": False}])
def test_a_token_that_leaves_out_the_person_claim_cannot_pass_for_another_person(gw, idp, claims):
    """Alice asks for her OIDC token without the email scope (or with an address the IdP did not verify):
    nothing names her person, and with `user_fallback: false` such an identity may not review at all."""
    name = f"ghost-stripped-{len(claims)}"
    held = kubectl(gw, "alice", STATIC["alice"][1], "delete", "pod", name, "-n", "prod")
    item = wait_pending(gw, name=name)
    token = mint(idp, "alice", **claims)
    status, answer = api(gw, "POST", f"/api/approvals/{item['id']}/approve", token, {})
    assert status == 403 and "has no person key" in answer["error"], answer
    assert api(gw, "GET", f"/api/approvals/{item['id']}", STATIC["ray"][1])[1]["state"] == "pending"
    api(gw, "POST", f"/api/approvals/{item['id']}/deny", STATIC["ray"][1], {"comment": "cleanup"})
    code, _, err = finish(held)
    assert code == 1 and "denied by ray" in err
