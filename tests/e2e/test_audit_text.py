"""`kubegate audit commands` and `kubegate replay --user` read right (issue 16), from a real run: real kubectl
through the gateway, a delete held for approval and approved by a reviewer, an exec session, a guardrail."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator

import pytest
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, start_sandbox, stop_process
from kubetest import gateway_api, run_kubectl, wait_for

RITA = ("rita", ["reviewers"], "rita-token-0123456789abcdef")
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "bots-never-delete-in-prod", "match": {"groups": ["ci"], "verbs": ["delete"], "namespaces": ["prod"]},
         "action": "deny", "message": "CI may not delete anything in prod"},
        {"name": "prod-pod-deletes", "match": {"verbs": ["delete"], "resources": ["pods"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
        {"name": "prod-exec", "match": {"resources": ["pods/exec"], "namespaces": ["prod"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Iterator[Gateway]:
    """A gateway on a sandbox of its own (a pod is deleted), after alice and ci-bot ran their commands."""
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox-audit-text"))
    directory = tmp_path_factory.mktemp("gw-audit-text")
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    user, groups, token = RITA
    plugins["static-tokens"]["tokens"].append(
        {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
    )
    plugins.update({"policy": POLICY, "approvals": {}, "audit-db": {}, "recording": {}})
    gw = start_gateway(directory, config)
    try:
        run_kubectl(gw.kubeconfig("alice"), "get", "pods", "-n", "prod", check=True)
        approve_while_held(gw, ["delete", "pod", "web-0", "-n", "prod"])
        approve_while_held(gw, ["exec", "web", "-n", "prod", "--", "sh", "-c", "echo exec-ran"])
        run_kubectl(gw.kubeconfig("ci-bot"), "delete", "pod", "web", "-n", "prod")  # refused by the guardrail
        wait_for(lambda: len(kubegate(gw, "audit", "commands").stdout.splitlines()) >= 4, "the four commands")
        yield gw
    finally:
        stop_process(gw.process)
        stop_process(sandbox.process)


def approve_while_held(gw: Gateway, args: list[str]) -> None:
    held = subprocess.Popen(
        [str(VENV_BIN / "kubectl"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig("alice")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:

        def pending() -> list[dict]:
            status, answer = gateway_api(gw, "GET", "/api/approvals", RITA[2])
            assert status == 200, answer
            return [item for item in answer["items"] if item["state"] == "pending"]

        item = wait_for(pending, f"the held `kubectl {args[0]}`", timeout=20)[0]
        status, answer = gateway_api(gw, "POST", f"/api/approvals/{item['id']}/approve", RITA[2], {})
        assert status == 200, answer
        _, err = held.communicate(timeout=60)
        assert held.returncode == 0, err
    finally:
        if held.poll() is None:
            held.kill()


def kubegate(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "kubegate"), *args, "--config", str(gw.config)], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip


@pytest.mark.needs_pods
def test_audit_commands_one_line_per_kubectl_command(ran):
    lines = kubegate(ran, "audit", "commands").stdout.splitlines()
    # kubectl's dispatcher asks /version (without a session header) before each command: part of it, no line
    # of its own.
    assert not [line for line in lines if " called " in line], lines
    assert len(lines) == 4, lines
    get, delete, exec_, refused = lines
    assert "alice ran `kubectl get` on sandbox → " in get and "failed" not in get
    # Held, approved, done: kubectl's wait for the pod to be gone (a 404) is not a failure.
    assert "alice ran `kubectl delete` on sandbox → " in delete and delete.endswith("approved by rita"), (
        delete
    )
    assert "failed" not in delete
    assert "alice ran `kubectl exec` on sandbox → " in exec_ and exec_.endswith("approved by rita"), exec_
    assert "ci-bot ran `kubectl delete` on sandbox → " in refused and refused.endswith("1 denied"), refused


@pytest.mark.needs_pods
def test_replay_user_lines_name_sessions_approvers_and_the_command_once(ran):
    walk = subprocess.run(
        [str(VENV_BIN / "kubegate"), "replay", "--user", "alice", "--since", "1h", "--speed", "1000",
         "--config", str(ran.config)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert walk.returncode == 0, walk.stderr
    assert "exec-ran" in walk.stdout
    assert walk.stderr.splitlines()[-1].startswith("alice: ") and ", 1 session played since " in walk.stderr
    lines = walk.stderr.splitlines()
    assert not [line for line in lines if "kubectl kubectl" in line], lines
    assert any(line.endswith("[kubectl delete]") for line in lines), lines
    start = next(line for line in lines if " session_start " in line)
    assert " exec pods web -n prod  101 allow (approved by rita)  [kubectl exec]" in start, start
    approved = [line for line in lines if " approval.approved " in line]
    assert len(approved) == 2 and all(line.endswith("approved by rita") for line in approved), approved
    assert any(" delete pods web-0 -n prod " in line for line in approved), approved
    assert any(" exec pods web -n prod: sh -c 'echo exec-ran' " in line for line in approved), approved
    requested = next(line for line in lines if " approval.requested " in line)
    assert requested.endswith("held by rule prod-pod-deletes"), requested
    # Non-resource calls say which path they were.
    assert any(" get /api  200 allow" in line for line in lines), lines
