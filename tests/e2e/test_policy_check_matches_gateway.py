"""`kubegate policy check --as USER` answers as the live gateway decides the same request (issue 16: it did not
know a static-token user's groups, so `--as ci-bot` was allowed what the gateway refuses ci-bot)."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from conftest import GATEWAY_USERS, VENV_BIN, free_port, gateway_config, start_gateway

KUBEGATE = str(VENV_BIN / "kubegate")
POD = "h7-no-such-pod"  # allowed deletes reach the sandbox and find nothing: no seeded pod is touched
RULES = {
    "default": "allow",
    "rules": [
        {
            "name": "bots-never-delete-in-prod",
            "match": {"groups": ["ci"], "verbs": ["delete"], "namespaces": ["prod"]},
            "action": "deny",
            "message": "CI may not delete anything in prod; ask a human",
        },
        {
            "name": "readonly-reads-only",
            "match": {"groups": ["readonly"], "verbs": ["delete", "create", "update", "patch"]},
            "action": "deny",
            "message": "read-only",
        },
    ],
}


@pytest.fixture(scope="module")
def policy_gateway(sandbox, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw-policy-check")
    config = gateway_config(sandbox, directory, free_port())
    config["connections"]["sandbox"]["plugins"]["policy"] = RULES
    gw = start_gateway(directory, config)
    yield gw
    gw.stop()


def live_decision(gw, user: str) -> str:
    """What the gateway did with `kubectl delete pod POD -n prod` sent with USER's static token."""
    request = urllib.request.Request(f"{gw.url}/k8s/sandbox/api/v1/namespaces/prod/pods/{POD}", method="DELETE",
                                     headers={"Authorization": f"Bearer {GATEWAY_USERS[user][1]}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(gw.ca_file))):
            return "allow"
    except urllib.error.HTTPError as exc:
        status = json.loads(exc.read())
        # The gateway's refusal names its rule's message (a cluster's own 403 would not).
        if exc.code == 403 and any(rule["message"] in status.get("message", "") for rule in RULES["rules"]):
            return "deny"
        assert exc.code == 404, status  # allowed through: the sandbox has no such pod
        return "allow"


@pytest.mark.parametrize("user", sorted(GATEWAY_USERS))
def test_policy_check_answers_as_the_gateway_decides(policy_gateway, user):
    checked = subprocess.run([KUBEGATE, "policy", "check", "-c", str(policy_gateway.config), "--connection", "sandbox",
                              "--as", user, "-o", "json", "--", "kubectl", "delete", "pod", POD, "-n", "prod"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    answer = json.loads(checked.stdout)
    assert answer["identity"]["groups"] == GATEWAY_USERS[user][0]
    assert answer["identity"]["source"].startswith(f"groups and method from {user}'s static token")
    assert answer["decision"] == live_decision(policy_gateway, user), (user, answer)
    # Not a test that cannot fail: the users are decided differently.
    expected = {"alice": "allow", "bob": "deny", "ci-bot": "deny"}
    assert answer["decision"] == expected[user]
