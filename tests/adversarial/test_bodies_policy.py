"""Issue 13 §2 with a real gateway, the sandbox and real kubectl: a deny rule on privileged pods (and one on
hostPID) holds in every body encoding the API server accepts. Each crafted body is sent with alice's valid
developer token; the tests assert on the answer, on what reached the sandbox and on what it stored. Benign
bodies in every type — what kubectl's generators, apply and patch send — still pass with the rules on."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl
from yarl import URL

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from test_bodies import PROTOBUF, envelope, ld, vi

ALICE = GATEWAY_USERS["alice"][1]
NS = "dev"
PODS = f"/api/v1/namespaces/{NS}/pods"
PRIVILEGED = (
    "request.patchType == 'json-patch' ? object.exists(op, op.path.startsWith('/spec')) : "
    "has(object.spec) && has(object.spec.containers) && object.spec.containers.exists(c, "
    "has(c.securityContext) && has(c.securityContext.privileged) && c.securityContext.privileged)"
)
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "no-privileged-pods", "action": "deny", "message": "privileged pods are not allowed",
         "match": {"verbs": ["create", "update", "patch"], "resources": ["pods"], "condition": PRIVILEGED}},
        {"name": "no-host-pid", "action": "deny", "message": "hostPID pods are not allowed",
         "match": {"verbs": ["create", "update"], "resources": ["pods"],
                   "condition": "has(object.spec.hostPID) && object.spec.hostPID"}},
        # Conditions on what kubectl's generators send as protobuf: their bodies must decode strictly.
        {"name": "no-host-pid-workloads", "action": "deny",
         "match": {"verbs": ["create"], "resources": ["deployments", "jobs"],
                   "condition": "has(object.spec.template.spec.hostPID) && object.spec.template.spec.hostPID"}},
        {"name": "no-forbidden-label", "action": "deny",
         "match": {"verbs": ["create"], "resources": ["secrets", "configmaps", "services", "serviceaccounts",
                                                      "cronjobs", "roles", "rolebindings"],
                   "condition": "has(object.metadata.labels) && 'forbidden' in object.metadata.labels"}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-bodies")
    config = gateway_config(sandbox, directory, free_port())
    config["connections"]["sandbox"]["plugins"].update({"policy": POLICY, "audit-file": {}})
    config["plugins"] = {"audit-file": {"path": str(directory / "audit.jsonl")}}
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


def kc(gw: Gateway, *args: str, input: str | None = None) -> tuple[int, str]:
    proc = run_kubectl(gw.kubeconfig("alice"), "-n", NS, *args, input=input)
    return proc.returncode, proc.stdout + proc.stderr


async def send(gw: Gateway, method: str, path: str, content_type: str, body: bytes) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": content_type}
    async with aiohttp.ClientSession() as session:
        url = URL(f"{gw.connection_url('sandbox')}{path}", encoded=True)
        async with session.request(method, url, data=body, headers=headers, ssl=ctx) as resp:
            return resp.status, json.loads(await resp.read())


async def stored_pod(sandbox, name: str) -> dict | None:
    """The pod as the sandbox stores it (asked directly, not through the gateway)."""
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{sandbox.url}{PODS}/{name}", headers={"Authorization": f"Bearer {sandbox.token}"}, ssl=ctx
        ) as resp:
            return None if resp.status == 404 else await resp.json()


def writes_to(sandbox, since: int, name: str) -> list[dict]:
    return [
        r for r in sandbox.requests_log(since)
        if r["method"] in ("POST", "PUT", "PATCH") and (r["path"].endswith(f"/pods/{name}") or r["path"] == PODS)
    ]  # fmt: skip


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def pod_json(name: str, privileged: bool = True, **spec) -> dict:
    container = {"name": "c", "image": "busybox", "command": ["sleep", "3600"]}
    if privileged:
        container["securityContext"] = {"privileged": True}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container], **spec},
    }


def pod_yaml(name: str) -> bytes:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: c\n"
        f"    image: busybox\n    securityContext:\n      privileged: yes\n"
    ).encode()


def pod_protobuf(name: str, *extra_spec: bytes, privileged: bool = True) -> bytes:
    security = ld(15, vi(2, 1)) if privileged else b""  # securityContext {privileged: true}
    container = ld(1, b"c") + ld(2, b"busybox") + security
    return envelope("v1", "Pod", ld(1, ld(1, name.encode())) + ld(2, ld(2, container) + b"".join(extra_spec)))


PRIVILEGED_MSG = "privileged pods are not allowed"
CREATES = [
    ("json", "application/json", lambda n: json.dumps(pod_json(n)).encode(), 403, PRIVILEGED_MSG),
    ("yaml", "application/yaml", pod_yaml, 403, PRIVILEGED_MSG),
    ("yaml-charset", "application/yaml; charset=utf-8", pod_yaml, 403, PRIVILEGED_MSG),
    ("protobuf", PROTOBUF, pod_protobuf, 403, PRIVILEGED_MSG),
    # hostPID=12 was not in the old schema: skipped, so the pod looked harmless
    ("protobuf-hostpid", "application/vnd.kubernetes.protobuf",
     lambda n: pod_protobuf(n, vi(12, 1), privileged=False), 403, "hostPID pods are not allowed"),
    # a field the gateway's schema lacks (ephemeralContainers=34): refused, not skipped
    ("protobuf-unknown-field", "application/vnd.kubernetes.protobuf",
     lambda n: pod_protobuf(n, ld(34, ld(1, b"x")), privileged=False), 403,
     "the request body could not be read: the protobuf body cannot be read: field 34 of PodSpec"),
    ("json-duplicate-key", "application/json",
     lambda n: json.dumps(pod_json(n, False))[:-1].encode() + b',"spec":' + json.dumps(pod_json(n)["spec"]).encode()
     + b"}", 403, "duplicate key 'spec'"),
    ("yaml-two-documents", "application/yaml",
     lambda n: pod_yaml(n).replace(b"privileged: yes", b"privileged: no") + b"---\n" + pod_yaml(n), 403,
     "the YAML body has 2 documents"),
    ("yaml-merge-key", "application/yaml",
     lambda n: b"x: &sc {privileged: true}\n" + pod_yaml(n).replace(b"privileged: yes", b"<<: *sc"), 403,
     "YAML merge keys"),
    ("text-yaml", "text/yaml", pod_yaml, 415, "unknown format"),
    ("cbor", "application/cbor", lambda n: b"\xd9\xd9\xf7\xa0", 415, "application/cbor bodies are not accepted"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "content_type", "make", "status", "message"), CREATES, ids=[c[0] for c in CREATES]
)
async def test_a_privileged_pod_is_refused_in_every_encoding(
    gw, sandbox, kind, content_type, make, status, message
):
    name = f"adv-{kind}"
    since = last_id(sandbox)
    code, answer = await send(gw, "POST", PODS, content_type, make(name))
    assert (code, answer["kind"]) == (status, "Status"), answer
    assert message in answer["message"], answer
    assert writes_to(sandbox, since, name) == [] and await stored_pod(sandbox, name) is None


@pytest.fixture(scope="module")
def target(gw) -> str:
    """A benign pod for the patches to aim at, created through the gateway by kubectl (allowed)."""
    code, out = kc(gw, "run", "adv-target", "--image=busybox", "--restart=Never", "--", "sleep", "3600")
    assert code == 0, out
    return "adv-target"


PATCHES = [
    ("strategic", "application/strategic-merge-patch+json",
     {"spec": {"containers": [{"name": "adv-target", "securityContext": {"privileged": True}}]}}),
    ("merge", "application/merge-patch+json",
     {"spec": {"containers": [{"name": "adv-target", "image": "busybox", "securityContext": {"privileged": True}}]}}),
    ("json", "application/json-patch+json",
     [{"op": "add", "path": "/spec/containers/0/securityContext", "value": {"privileged": True}}]),
    ("apply", "application/apply-patch+yaml",
     {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "adv-target"},
      "spec": {"containers": [{"name": "adv-target", "securityContext": {"privileged": True}}]}}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "content_type", "doc"), PATCHES, ids=[p[0] for p in PATCHES])
async def test_a_patch_that_makes_a_pod_privileged_is_refused(gw, sandbox, target, kind, content_type, doc):
    since = last_id(sandbox)
    query = "?fieldManager=attacker&force=true" if kind == "apply" else ""
    body = yaml.safe_dump(doc).encode() if kind == "apply" else json.dumps(doc).encode()  # as kubectl sends
    code, answer = await send(gw, "PATCH", f"{PODS}/{target}{query}", content_type, body)
    assert code == 403 and PRIVILEGED_MSG in answer["message"], answer
    assert writes_to(sandbox, since, target) == []
    stored = await stored_pod(sandbox, target)
    assert stored is not None and "securityContext" not in stored["spec"]["containers"][0]


async def test_a_json_patch_pointer_the_api_server_reads_otherwise_is_refused(gw, sandbox, target):
    """gopkg.in/evanphx/json-patch.v4 (the API server's) drops a pointer's first segment: `x/spec/...` is
    /spec/... there, while `op.path.startsWith('/spec')` (the rule's condition) is false. Refused with 400."""
    since = last_id(sandbox)
    ops = [{"op": "add", "path": "x/spec/containers/0/securityContext", "value": {"privileged": True}}]
    code, answer = await send(
        gw, "PATCH", f"{PODS}/{target}", "application/json-patch+json", json.dumps(ops).encode()
    )
    assert code == 400 and "drops its first segment" in answer["message"], answer
    assert "'/spec/containers/0/securityContext'" in answer["message"]
    assert writes_to(sandbox, since, target) == []


async def test_real_kubectl_run_privileged_is_denied_and_the_audit_says_why(gw, sandbox):
    since = last_id(sandbox)
    code, out = kc(gw, "run", "adv-kubectl-priv", "--image=busybox", "--privileged", "--", "sleep", "1")
    assert code != 0 and PRIVILEGED_MSG in out, out  # kubectl run sends JSON; the rule sees the object
    assert writes_to(sandbox, since, "adv-kubectl-priv") == []
    code, answer = await send(gw, "POST", PODS, "application/yaml", pod_yaml("adv-audit") + b"---\n")
    assert code == 403, answer
    await asyncio.sleep(1.0)  # audit events are written once the response is out
    audit = (gw.dir / "audit.jsonl").read_text()
    assert PRIVILEGED_MSG in audit
    assert "policy rule no-privileged-pods: the request body could not be read: the YAML body has 2" in audit


def test_benign_writes_in_every_type_pass_with_the_rules_on(gw, sandbox, target):
    """What kubectl sends — generators' protobuf, apply's JSON and strategic merge patches, label's merge
    patch, server-side apply's YAML, patch --type=json — is read, judged and let through."""
    steps = [
        ["create", "deployment", "adv-deploy", "--image=busybox"],
        ["create", "job", "adv-job", "--image=busybox", "--", "true"],
        ["create", "cronjob", "adv-cron", "--image=busybox", "--schedule=*/5 * * * *", "--", "true"],
        ["create", "secret", "generic", "adv-secret", "--from-literal=a=b"],
        ["create", "configmap", "adv-cm", "--from-literal=a=b"],
        ["create", "service", "clusterip", "adv-svc", "--tcp=80:8080"],
        ["create", "serviceaccount", "adv-sa"],
        ["run", "adv-benign", "--image=busybox", "--restart=Never", "--", "sleep", "3600"],
        ["label", "pod", target, "adv=1"],
        ["patch", "pod", target, "-p", '{"metadata":{"annotations":{"adv":"strategic"}}}'],
        ["patch", "pod", target, "--type=merge", "-p", '{"metadata":{"annotations":{"adv":"merge"}}}'],
        ["patch", "pod", target, "--type=json", "-p", '[{"op":"add","path":"/metadata/annotations/j","value":"x"}]'],
    ]  # fmt: skip
    for args in steps:
        code, out = kc(gw, *args)
        assert code == 0, (args, out)
    manifest = json.dumps(pod_json("adv-applied", privileged=False))
    for args in (["apply", "-f", "-"], ["apply", "--server-side", "-f", "-"]):
        code, out = kc(gw, *args, input=manifest)
        assert code == 0, (args, out)
    changed = pod_json("adv-applied", privileged=False)
    changed["metadata"]["labels"] = {"tier": "web"}
    code, out = kc(gw, "apply", "-f", "-", input=json.dumps(changed))  # a strategic merge patch now
    assert code == 0, out


async def test_protobuf_bodies_of_kubectl_generators_are_judged(gw, sandbox):
    """kubectl's generators send protobuf (what makes the strict decoder's coverage meaningful), and what a
    protobuf body says is seen: a forbidden label in a crafted protobuf Secret is denied."""
    since = last_id(sandbox)
    code, out = kc(gw, "create", "configmap", "adv-cm-2", "--from-literal=a=b", "--dry-run=server")
    assert code == 0, out
    posted = [r for r in sandbox.requests_log(since) if r["method"] == "POST"]
    assert posted and "protobuf" in posted[-1]["headers"].get("content-type", [""])[0], posted
    meta = ld(1, b"adv-labelled") + ld(11, ld(1, b"forbidden") + ld(2, b"1"))
    secret = envelope("v1", "Secret", ld(1, meta) + ld(2, ld(1, b"k") + ld(2, b"v")))
    code, answer = await send(gw, "POST", f"/api/v1/namespaces/{NS}/secrets", PROTOBUF, secret)
    assert code == 403 and "no-forbidden-label" in answer["message"], answer


async def test_two_content_types_are_refused(gw, sandbox):
    """Which of two Content-Type headers counts could differ between the gateway and the API server."""
    since = last_id(sandbox)
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = [("Authorization", f"Bearer {ALICE}"), ("Content-Type", "text/plain"),
               ("Content-Type", "application/yaml")]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        url = URL(f"{gw.connection_url('sandbox')}{PODS}", encoded=True)
        async with session.post(url, data=pod_yaml("adv-two-types"), headers=headers, ssl=ctx) as resp:
            assert resp.status == 415, await resp.text()
    assert (
        writes_to(sandbox, since, "adv-two-types") == []
        and await stored_pod(sandbox, "adv-two-types") is None
    )
