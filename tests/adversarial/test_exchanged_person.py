"""One person, one reviewer, through `/login/exchange`: a gateway token exchanged for one of a person's
credentials is that person (the method it is matched with is the original's), so Alice cannot approve
the request she made with one credential through a token exchanged for her other one — which `people.map`
ties to her by the documented `METHOD:USER` pattern. A real gateway (static tokens, the login plugin with
`allow_exchange`, policy holding pod deletes in prod) in front of the sandbox; kubectl holds the request,
reviewers act through the JSON API."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import gateway_api
from oidc_idp import IdP

KUBECTL = str(VENV_BIN / "kubectl")
STATIC = {
    "alice": (["developers"], "alice-exchanged-person-token-0123456789"),
    # Alice's second credential, a reviewer's: only the person rule stands between her and her request.
    "alice-admin": (["reviewers"], "alice-admin-exchanged-person-token-0123456789"),
    "ray": (["reviewers"], "ray-exchanged-person-token-0123456789"),
}
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "prod-pod-deletes", "match": {"verbs": ["delete"], "resources": ["pods"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 60}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    server = IdP("kubegate-exchanged-person")
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(sandbox, idp: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-exchanged-person")
    (directory / "client-secret").write_text("s\n")
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    plugins["static-tokens"]["tokens"] = [
        {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for user, (groups, token) in STATIC.items()
    ]
    plugins["policy"] = POLICY
    plugins["approvals"] = {}
    plugins["login"] = {}
    config["plugins"] = {
        "login": {
            "allow_exchange": True,
            "providers": [{"type": "oidc", "name": "corp", "issuer": idp.url, "client_id": "kubegate",
                           "client_secret_file": "client-secret"}],
        }
    }  # fmt: skip
    config["people"] = {
        "map": {
            "alice@example.com": ["static-tokens:alice", "static-tokens:alice-admin"],
            "ray@example.com": ["static-tokens:ray"],
        }
    }
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


def exchanged(gw: Gateway, user: str) -> str:
    status, minted = gateway_api(gw, "POST", "/login/exchange", STATIC[user][1], {"connection": "sandbox"})
    assert status == 200 and minted["method"] == "exchange", minted
    return minted["token"]


def wait_pending(gw: Gateway, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, answer = gateway_api(gw, "GET", "/api/approvals", STATIC["ray"][1])
        assert status == 200, answer
        for item in answer["items"]:
            if item.get("name") == name:
                return item
        time.sleep(0.2)
    raise AssertionError(f"no pending request for {name}")


def test_a_token_exchanged_for_the_requesters_other_credential_cannot_approve(gw):
    held = subprocess.Popen(
        [KUBECTL, "delete", "pod", "ghost-exchanged", "-n", "prod"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig("alice", token=STATIC["alice"][1])), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        item = wait_pending(gw, "ghost-exchanged")
        assert item["requester_person"] == "alice@example.com"
        for token in (STATIC["alice-admin"][1], exchanged(gw, "alice-admin")):
            status, answer = gateway_api(gw, "POST", f"/api/approvals/{item['id']}/approve", token, {})
            assert status == 403, answer
            assert "same person, alice@example.com" in answer["error"]
        # Another person's exchanged token may; the approval is recorded as that person's.
        status, answer = gateway_api(
            gw, "POST", f"/api/approvals/{item['id']}/approve", exchanged(gw, "ray"), {}
        )
        assert status == 200 and answer["state"] == "approved", answer
        (approval,) = answer["approvals"]
        assert approval["person"] == "ray@example.com" and approval["method"] == "login:exchange"
        _, err = held.communicate(timeout=30)
        assert held.returncode == 1 and 'pods "ghost-exchanged" not found' in err  # released
    finally:
        if held.poll() is None:
            held.kill()
            held.communicate()
