"""Creating an object without the verb `create` (security.md §1): a server-side apply (`PATCH` with
`application/apply-patch+yaml`) creates the object when it is missing — the API server then authorizes a
`create` too and admits it as CREATE (handlers/patch.go) —, and so does a PUT of a resource whose strategy
allows create on update (RoleBinding, Role, Lease, Service… handlers/update.go). A `verbs: [create]` rule
(docs/policy.md's `no-privileged-pods`, an approval on new deployments or role bindings) must hold for
them as for a POST. Each request is sent with alice's developer token; the tests assert on the answer, on
what reached the sandbox and on what it stored. The sandbox answers 404 to a PUT of a missing object, so a
PUT-create is shown held here (before anything goes upstream) and judged in tests/unit/test_policy.py."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterator

import aiohttp
import pytest
import yaml
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import gateway_api, run_kubectl
from yarl import URL

ALICE = GATEWAY_USERS["alice"][1]
REVIEWER = "sre-sam-token-0123456789abcdef"
NS = "dev"
PODS = f"/api/v1/namespaces/{NS}/pods"
APPLY = "application/apply-patch+yaml"
PRIVILEGED = (  # docs/policy.md's example rule
    "object.spec.containers.exists(c, has(c.securityContext) && "
    "has(c.securityContext.privileged) && c.securityContext.privileged)"
)
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "no-privileged-pods", "action": "deny", "message": "privileged pods are not allowed",
         "match": {"verbs": ["create"], "resources": ["pods"], "condition": PRIVILEGED}},
        {"name": "no-host-pid", "action": "deny", "message": "hostPID pods are not allowed",
         "match": {"verbs": ["create", "update"], "resources": ["pods"],
                   "condition": "has(object.spec.hostPID) && object.spec.hostPID"}},
        {"name": "new-deployments-need-review", "action": "approve", "message": "a new deployment",
         "match": {"verbs": ["create"], "resources": ["deployments"]}, "approval": {"reviewer_groups": ["sre"]}},
        {"name": "new-rolebindings-need-review", "action": "approve", "message": "a new role binding",
         "match": {"verbs": ["create"], "resources": ["rolebindings"]}, "approval": {"reviewer_groups": ["sre"]}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-create-without-create")
    config = gateway_config(sandbox, directory, free_port())
    plugins = config["connections"]["sandbox"]["plugins"]
    plugins["static-tokens"]["tokens"].append(
        {"user": "sre-sam", "groups": ["sre"], "sha256": hashlib.sha256(REVIEWER.encode()).hexdigest()}
    )
    plugins.update({"policy": POLICY, "approvals": {}})
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


async def send(
    gw: Gateway, method: str, path: str, content_type: str, body: bytes, wait: float = 20
) -> tuple[int, dict | None]:
    """(status, Status or object); (0, None) when the gateway still holds the request after `wait` seconds."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": content_type}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=wait)) as session:
        url = URL(f"{gw.connection_url('sandbox')}{path}", encoded=True)
        try:
            async with session.request(method, url, data=body, headers=headers, ssl=ctx) as resp:
                return resp.status, json.loads(await resp.read())
        except TimeoutError:
            return 0, None


async def stored_pod(sandbox, name: str) -> dict | None:
    """The pod as the sandbox stores it (asked directly, not through the gateway)."""
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{sandbox.url}{PODS}/{name}", headers={"Authorization": f"Bearer {sandbox.token}"}, ssl=ctx
        ) as resp:
            return None if resp.status == 404 else await resp.json()


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def writes(sandbox, since: int) -> list[dict]:
    return [r for r in sandbox.requests_log(since) if r["method"] in ("POST", "PUT", "PATCH")]


def pod(name: str, **spec) -> dict:
    container = {"name": "c", "image": "busybox", "command": ["sleep", "3600"]}
    if not spec:
        container["securityContext"] = {"privileged": True}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], **spec}}  # fmt: skip


def pending(gw: Gateway, name: str) -> list[dict]:
    status, answer = gateway_api(gw, "GET", "/api/approvals?state=pending", REVIEWER)
    assert status == 200, answer
    return [item for item in answer["items"] if item["name"] == name]


async def test_control_a_post_of_the_privileged_pod_is_denied(gw, sandbox):
    code, answer = await send(gw, "POST", PODS, "application/json", json.dumps(pod("cwc-post")).encode())
    assert code == 403 and "privileged pods are not allowed" in answer["message"], answer
    assert await stored_pod(sandbox, "cwc-post") is None


@pytest.mark.parametrize(
    ("what", "message"),
    [("privileged", "privileged pods are not allowed"), ("hostpid", "hostPID pods are not allowed")],
)
async def test_a_server_side_apply_creating_the_pod_is_denied_too(gw, sandbox, what, message):
    name = f"cwc-ssa-{what}"
    doc = pod(name) if what == "privileged" else pod(name, hostPID=True)
    since = last_id(sandbox)
    code, answer = await send(
        gw, "PATCH", f"{PODS}/{name}?fieldManager=cwc", APPLY, yaml.safe_dump(doc).encode()
    )
    assert code == 403 and message in answer["message"], answer
    assert writes(sandbox, since) == []
    assert await stored_pod(sandbox, name) is None


def test_kubectl_apply_server_side_of_a_privileged_pod_is_denied(gw, sandbox):
    proc = run_kubectl(gw.kubeconfig("alice"), "-n", NS, "apply", "--server-side", "-f", "-",
                       input=json.dumps(pod("cwc-kubectl-ssa")))  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "privileged pods are not allowed" in out, out


def test_a_benign_server_side_apply_still_creates_and_updates(gw, sandbox):
    benign = {**pod("cwc-benign", restartPolicy="Never")}
    for _ in range(2):  # the create, then the update of what exists
        proc = run_kubectl(gw.kubeconfig("alice"), "-n", NS, "apply", "--server-side", "-f", "-",
                           input=json.dumps(benign))  # fmt: skip
        assert proc.returncode == 0, proc.stderr


async def test_a_server_side_apply_creating_a_deployment_waits_for_review(gw, sandbox):
    """The approve rule on creating deployments holds a server-side apply as it holds a POST, and tells the
    reviewers why a patch is held by a rule on creates."""
    doc = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cwc-deploy"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "9"]}]}}}}  # fmt: skip
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/cwc-deploy?fieldManager=cwc"
    since = last_id(sandbox)
    assert await send(gw, "PATCH", path, APPLY, yaml.safe_dump(doc).encode(), wait=2) == (0, None)
    assert writes(sandbox, since) == []
    [held] = pending(gw, "cwc-deploy")
    assert (held["rule"], held["verb"]) == ("new-deployments-need-review", "patch")
    assert "creates the object when it is missing" in json.dumps(held)


async def test_a_put_that_may_create_a_role_binding_waits_for_review(gw, sandbox):
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "cwc-admin", "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "User", "name": "alice"}]}  # fmt: skip
    path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/cwc-admin"
    since = last_id(sandbox)
    assert await send(gw, "PUT", path, "application/json", json.dumps(binding).encode(), wait=2) == (
        0,
        None,
    )
    assert writes(sandbox, since) == []
    [held] = pending(gw, "cwc-admin")
    assert (held["rule"], held["verb"]) == ("new-rolebindings-need-review", "update")
