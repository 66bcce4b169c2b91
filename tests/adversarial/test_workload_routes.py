"""Routes that reach containers or change workloads without a delete (issue 13, §5): pods/eviction,
pods/ephemeralcontainers (`kubectl debug`), pods/proxy, services/proxy, pods/portforward and */scale.

The gateway's `guarded` connection enforces exactly the rules of docs/policy.md's "Examples: routes that
reach containers or change workloads" (read from the document, each turned into a deny so nothing waits for
a reviewer); the `sandbox` connection has no policy. Every route is tried with a valid developer token,
with real kubectl, the official `kubernetes` client and crafted HTTP (encoded paths, port-qualified names,
other methods): refused on `guarded` with nothing of it reaching the cluster, and really done on `sandbox`.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import (
    GATEWAY_USERS,
    Gateway,
    Sandbox,
    free_port,
    gateway_config,
    start_gateway,
    start_sandbox,
    stop_process,
)
from kubetest import KUBECTL, Background, kubectl_env, run_kubectl
from workload_pods import (
    apply,
    echo_pod,
    echo_ready,
    echo_service,
    eviction_protobuf,
    sleeper_pod,
    wait_for,
)
from yarl import URL

ALICE = GATEWAY_USERS["alice"][1]
REVIEWER_TOKEN = "sre-sam-token-0123456789abcdef"  # user sre-sam, group sre: the docs' reviewer group
POLICY_DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"
SECTION = "## Examples: routes that reach containers or change workloads"


def documented_rules() -> list[dict[str, Any]]:
    """The YAML rules of the docs section, verbatim."""
    text = POLICY_DOC.read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "the examples section has no yaml block"
    return yaml.safe_load(block.group(1))["rules"]


def as_denials(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": r["name"], "match": r["match"], "action": "deny", "message": f"refused by {r['name']}"}
        for r in rules
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox of this module's own: these tests evict, scale and debug its pods."""
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox-workload-routes"))
    apply(
        sandbox.kubeconfig,
        echo_pod("echo", "prod"),
        echo_service("echo", "prod"),
        sleeper_pod("debug-me", "prod"),
        sleeper_pod("evict-me", "prod"),
        sleeper_pod("evict-me-too", "prod"),
    )
    echo_ready(sandbox.kubeconfig, "prod", "echo")
    yield sandbox
    stop_process(sandbox.process)


@pytest.fixture(scope="module")
def gw(cluster: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-workload-routes")
    config = gateway_config(cluster, directory, free_port())
    open_connection = config["connections"]["sandbox"]
    open_connection["plugins"]["static-tokens"]["tokens"].append(
        {"user": "sre-sam", "groups": ["sre"], "sha256": hashlib.sha256(REVIEWER_TOKEN.encode()).hexdigest()}
    )
    config["connections"]["guarded"] = {
        "upstream": open_connection["upstream"],
        "plugins": {
            **open_connection["plugins"],
            "policy": {"default": "allow", "rules": as_denials(documented_rules())},
        },
    }
    # The documented rules as written: held for a reviewer of group sre.
    config["connections"]["held"] = {
        "upstream": open_connection["upstream"],
        "plugins": {
            **open_connection["plugins"],
            "policy": {"default": "allow", "rules": documented_rules()},
            "approvals": {},
        },
    }
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


@pytest.fixture(scope="module")
def guarded(gw: Gateway) -> Path:
    return gw.kubeconfig("alice", "guarded")


@pytest.fixture(scope="module")
def unguarded(gw: Gateway) -> Path:
    return gw.kubeconfig("alice", "sandbox")


def last_id(sandbox: Sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def reached(sandbox: Sandbox, since: int, fragment: str) -> list[str]:
    """Paths the cluster received since `since` that contain `fragment`."""
    return [f"{r['method']} {r['path']}" for r in sandbox.requests_log(since) if fragment in r["path"]]


def pod(sandbox: Sandbox, name: str) -> dict[str, Any] | None:
    got = run_kubectl(sandbox.kubeconfig, "get", "pod", name, "-n", "prod", "-o", "json")
    return json.loads(got.stdout) if got.returncode == 0 else None


async def send(gw: Gateway, connection: str, method: str, path: str, body: bytes | None = None,
               content_type: str = "application/json") -> tuple[int, bytes]:  # fmt: skip
    """A crafted request through the gateway, the path sent exactly as written (encoded)."""
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": content_type}
    async with aiohttp.ClientSession() as session:
        url = URL(f"{gw.url}/k8s/{connection}{path}", encoded=True)
        async with session.request(method, url, data=body, headers=headers, ssl=context) as resp:
            return resp.status, await resp.read()


def assert_refused(status: int, body: bytes, rule: str) -> None:
    assert status == 403, (status, body)
    answer = json.loads(body)
    assert answer["kind"] == "Status" and rule in answer["message"], answer


def test_the_documented_rules_cover_every_route():
    resources = {r for rule in documented_rules() for r in rule["match"]["resources"]}
    assert {"pods/eviction", "pods/ephemeralcontainers", "pods/proxy", "services/proxy", "pods/portforward",
            "deployments/scale", "statefulsets/scale", "replicasets/scale"} <= resources  # fmt: skip


# --- kubectl debug: pods/ephemeralcontainers ------------------------------------------------------------


def test_kubectl_debug_is_refused_and_no_container_starts(gw, cluster, guarded, unguarded):
    since = last_id(cluster)
    refused = run_kubectl(guarded, "debug", "debug-me", "-n", "prod", "--image=busybox", "--", "echo", "hi")
    assert refused.returncode != 0 and "refused by debug-containers-in-prod" in refused.stderr, refused.stderr
    assert reached(cluster, since, "ephemeralcontainers") == []
    assert not pod(cluster, "debug-me")["spec"].get("ephemeralContainers")

    done = run_kubectl(unguarded, "debug", "debug-me", "-n", "prod", "--image=busybox", "--", "echo", "hi")
    assert done.returncode == 0, done.stderr
    name = re.search(r"(debugger-\w+)", done.stdout + done.stderr).group(1)
    assert [c["name"] for c in pod(cluster, "debug-me")["spec"]["ephemeralContainers"]] == [name]
    wait_for(lambda: run_kubectl(unguarded, "logs", "debug-me", "-n", "prod", "-c", name).stdout == "hi\n",
             what="the debug container's output")  # fmt: skip


async def test_crafted_ephemeral_container_writes_are_refused(gw, cluster):
    since = last_id(cluster)
    add = json.dumps({"spec": {"ephemeralContainers": [{"name": "sneak", "image": "busybox"}]}}).encode()
    smp = "application/strategic-merge-patch+json"
    for path, method in (
        ("/api/v1/namespaces/prod/pods/debug-me/ephemeralcontainers", "PATCH"),
        ("/api/v1/namespaces/prod/pods/debug-me/ephemeralcontainers/", "PATCH"),
        ("/api/v1/namespaces/prod/pods/debug-me/%65phemeralcontainers", "PATCH"),
        ("/api/v1/namespaces/prod/pods/debug-me/ephemeralcontainers?dryRun=All", "PATCH"),
        ("/api/v1/namespaces/prod/pods/debug-me/ephemeralcontainers", "PUT"),
    ):
        status, body = await send(
            gw, "guarded", method, path, add, smp if method == "PATCH" else "application/json"
        )
        assert_refused(status, body, "debug-containers-in-prod")
    assert reached(cluster, since, "phemeralcontainers") == []
    # The side door, writing the pod itself, is closed by the API server (and the sandbox, like it).
    status, _ = await send(gw, "guarded", "PATCH", "/api/v1/namespaces/prod/pods/debug-me", add, smp)
    assert status == 422
    assert "sneak" not in json.dumps(pod(cluster, "debug-me")["spec"])


# --- eviction -------------------------------------------------------------------------------------------


def eviction(name: str) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": "prod"}}


def test_eviction_with_the_python_client_is_refused_and_the_pod_stays(gw, cluster, guarded, unguarded):
    kubernetes = pytest.importorskip("kubernetes")

    def core(kubeconfig: Path) -> Any:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        return kubernetes.client.CoreV1Api(api)

    body = kubernetes.client.V1Eviction(
        metadata=kubernetes.client.V1ObjectMeta(name="evict-me", namespace="prod")
    )
    since = last_id(cluster)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        core(guarded).create_namespaced_pod_eviction("evict-me", "prod", body)
    assert refused.value.status == 403 and "refused by evictions-in-prod" in refused.value.body
    assert reached(cluster, since, "eviction") == [] and pod(cluster, "evict-me") is not None

    core(unguarded).create_namespaced_pod_eviction("evict-me", "prod", body)
    assert pod(cluster, "evict-me") is None


def reviewer_api(gw: Gateway, method: str, path: str) -> Any:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    request = urllib.request.Request(f"{gw.url}{path}", method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {REVIEWER_TOKEN}",
                                              "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, context=context, timeout=20) as response:
        return json.loads(response.read())


def test_a_held_eviction_reaches_the_cluster_only_once_approved(gw, cluster, tmp_path):
    apply(cluster.kubeconfig, sleeper_pod("evict-after-review", "prod"))
    since = last_id(cluster)
    body = tmp_path / "eviction.json"
    body.write_text(json.dumps(eviction("evict-after-review")))
    path = "/api/v1/namespaces/prod/pods/evict-after-review/eviction"
    held = subprocess.Popen([KUBECTL, "create", "--raw", path, "-f", str(body)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kubectl_env(gw.kubeconfig("alice", "held")))  # fmt: skip

    def pending() -> dict[str, Any] | None:
        items = reviewer_api(gw, "GET", "/api/approvals?state=pending")["items"]
        return next((i for i in items if i.get("name") == "evict-after-review"), None)

    item = wait_for(pending, what="the held eviction")
    assert (item["verb"], item["resource"], item["rule"]) == ("create", "pods/eviction", "evictions-in-prod")
    time.sleep(1)
    assert held.poll() is None  # kubectl waits
    assert reached(cluster, since, "eviction") == [] and pod(cluster, "evict-after-review") is not None
    reviewer_api(gw, "POST", f"/api/approvals/{item['id']}/approve")
    out, err = held.communicate(timeout=30)
    assert held.returncode == 0 and json.loads(out)["status"] == "Success", err
    assert pod(cluster, "evict-after-review") is None


async def test_crafted_evictions_are_refused(gw, cluster, guarded):
    since = last_id(cluster)
    doc = json.dumps(eviction("evict-me-too")).encode()
    for path in (
        "/api/v1/namespaces/prod/pods/evict-me-too/eviction",
        "/api/v1/namespaces/prod/pods/evict-me-too/eviction/",
        "/api/v1/namespaces/prod/pods/evict-me-too/%65viction",
        "/api/v1/namespaces/prod//pods/evict-me-too/eviction",
    ):
        status, body = await send(gw, "guarded", "POST", path, doc)
        assert status in (400, 403), (path, status, body)
        if status == 403:
            assert_refused(status, body, "evictions-in-prod")
    # in protobuf, as kubectl drain's typed client sends it
    pb = "application/vnd.kubernetes.protobuf"
    status, body = await send(gw, "guarded", "POST", "/api/v1/namespaces/prod/pods/evict-me-too/eviction",
                              eviction_protobuf("evict-me-too", "prod"), pb)  # fmt: skip
    assert_refused(status, body, "evictions-in-prod")
    # kubectl itself, the way a script without drain would do it
    raw = run_kubectl(guarded, "create", "--raw", "/api/v1/namespaces/prod/pods/evict-me-too/eviction", "-f", "-",
                      input=json.dumps(eviction("evict-me-too")))  # fmt: skip
    assert raw.returncode != 0 and "refused by evictions-in-prod" in raw.stderr, raw.stderr
    assert reached(cluster, since, "viction") == [] and pod(cluster, "evict-me-too") is not None
    # without the rule the protobuf eviction goes through and the pod is gone
    status, body = await send(gw, "sandbox", "POST", "/api/v1/namespaces/prod/pods/evict-me-too/eviction",
                              eviction_protobuf("evict-me-too", "prod"), pb)  # fmt: skip
    assert status == 201 and pod(cluster, "evict-me-too") is None, body


# --- pods/proxy and services/proxy ----------------------------------------------------------------------


def test_pod_proxy_is_refused_in_every_form_and_works_without_the_rule(gw, cluster, guarded, unguarded):
    since = last_id(cluster)
    for name in ("echo", "echo:8000", "http:echo:8000"):
        got = run_kubectl(guarded, "get", "--raw", f"/api/v1/namespaces/prod/pods/{name}/proxy/admin?x=1")
        assert got.returncode != 0 and "refused by reach-prod-containers" in got.stderr, (name, got.stderr)
    assert reached(cluster, since, "proxy") == []

    got = run_kubectl(
        unguarded, "get", "--raw", "/api/v1/namespaces/prod/pods/echo:8000/proxy/admin?x=1&y=%2F"
    )
    assert got.returncode == 0, got.stderr
    seen = json.loads(got.stdout)
    assert seen["path"] == "/admin?x=1&y=%2F" and "authorization" not in seen["headers"]


async def test_crafted_proxy_requests_are_refused(gw, cluster):
    since = last_id(cluster)
    for method, path in (
        ("GET", "/api/v1/namespaces/prod/pods/echo/proxy"),
        ("GET", "/api/v1/namespaces/prod/pods/echo/proxy/"),
        ("HEAD", "/api/v1/namespaces/prod/pods/echo/proxy/"),
        ("POST", "/api/v1/namespaces/prod/pods/echo/proxy/shutdown"),
        ("PUT", "/api/v1/namespaces/prod/pods/echo/proxy/config"),
        ("PATCH", "/api/v1/namespaces/prod/pods/echo/proxy/config"),
        ("DELETE", "/api/v1/namespaces/prod/pods/echo/proxy/data"),
        ("GET", "/api/v1/namespaces/prod/pods/echo/%70roxy/"),
        ("GET", "/api/v1/namespaces/prod/pods/echo%3A8000/proxy/"),
        ("GET", "/api/v1/namespaces/prod/pods/echo/proxy/../../../../api/v1/namespaces/prod/secrets"),
        ("GET", "/api/v1/namespaces/prod/services/echo:http/proxy/"),
        ("POST", "/api/v1/namespaces/prod/services/https:echo:80/proxy/x"),
    ):
        status, body = await send(gw, "guarded", method, path, b"{}" if method != "GET" else None)
        if method == "HEAD":
            assert status == 403, (method, path, status)
        elif "/../" in path:
            assert status == 400, body  # the gateway refuses dot segments outright (fail closed)
        else:
            assert_refused(status, body, "reach-prod-containers")
    # OPTIONS (the API server's proxy serves it, as verb `options`) is refused too, by any rule or none.
    status, _ = await send(gw, "guarded", "OPTIONS", "/api/v1/namespaces/prod/pods/echo/proxy/")
    assert status in (403, 405)
    assert reached(cluster, since, "roxy") == []


ODD_PROXY_PATHS = [
    "/api/v1/namespaces/prod/pods/echo%2Fproxy/",  # an encoded slash: another split for another reader
    "/api/v1/namespaces/prod/pods/echo/proxy%2Fadmin",
    "/api/v1/namespaces/prod/pods/echo/proxy%00/",
    "/api/v1/namespaces/prod/pods/echo/proxy/%2e%2e/%2e%2e/x",
    "/api/v1/namespaces/prod//pods/echo/proxy/",
    "/api/v1/namespaces/prod/pods/./echo/proxy/",
    "//api/v1/namespaces/prod/pods/echo/proxy/",
    "/api/v1/namespaces/prod/pods/echo/PROXY/",  # not the subresource: the API server has no such route
    "/api/v1/namespaces/prod/pods/echo/proxy;x/",
    "/api/v1/namespaces/prod/pods/ECHO/proxy/",
    "/api/v1/namespaces/prod/pods/echo:8000:x/proxy/",
    "/api/v1/namespaces/prod/pods/echo/proxy/?watch=true",
]


@pytest.mark.parametrize("path", ODD_PROXY_PATHS)
async def test_odd_proxy_paths_reach_no_container(gw, cluster, path):
    status, body = await send(gw, "guarded", "GET", path)
    assert status in (400, 403, 404), (status, body)  # refused by the gateway, or no route upstream
    assert json.loads(body)["kind"] == "Status" and b'"path"' not in body


async def test_a_websocket_upgrade_through_the_proxy_is_refused(gw, cluster):
    """A container's WebSocket endpoint reached through pods/proxy is a GET upgrade: the same rule holds."""
    since = last_id(cluster)
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession() as session:
        url = f"{gw.url}/k8s/guarded/api/v1/namespaces/prod/pods/echo/proxy/ws"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={"Authorization": f"Bearer {ALICE}"}, ssl=context)
    assert refused.value.status == 403
    assert reached(cluster, since, "proxy") == []


async def test_the_old_proxy_verb_paths_reach_no_container(gw, cluster):
    """`/api/v1/proxy/namespaces/NS/pods/NAME` (verb `proxy`) matches no `pods/proxy` rule; it is safe only
    because the API server has no such route any more."""
    for path in (
        "/api/v1/proxy/namespaces/prod/pods/echo/",
        "/api/v1/proxy/namespaces/prod/services/echo:http/",
    ):
        status, body = await send(gw, "guarded", "GET", path)
        assert status in (404, 405), body  # no route (the sandbox says 405, the API server 404)
        assert '"path"' not in body.decode()  # not the echo server's answer


def test_service_proxy_is_refused_and_works_without_the_rule(gw, cluster, guarded, unguarded):
    since = last_id(cluster)
    path = "/api/v1/namespaces/prod/services/echo:http/proxy/status?verbose=1"
    got = run_kubectl(guarded, "get", "--raw", path)
    assert got.returncode != 0 and "refused by reach-prod-containers" in got.stderr, got.stderr
    assert reached(cluster, since, "proxy") == []
    got = run_kubectl(unguarded, "get", "--raw", path)
    assert got.returncode == 0 and json.loads(got.stdout)["path"] == "/status?verbose=1", got.stderr


# --- port-forward ---------------------------------------------------------------------------------------


def test_port_forward_is_refused_and_works_without_the_rule(gw, cluster, guarded, unguarded):
    since = last_id(cluster)
    local = free_port()
    refused = subprocess.run([KUBECTL, "port-forward", "pod/echo", "-n", "prod", f"{local}:8000"],
                             capture_output=True, text=True, timeout=60, env=kubectl_env(guarded))  # fmt: skip
    assert refused.returncode != 0 and "refused by reach-prod-containers" in refused.stderr, refused.stderr
    assert reached(cluster, since, "portforward") == []

    forward = Background(["kubectl", "port-forward", "pod/echo", "-n", "prod", f"{local}:8000"], unguarded)
    try:
        forward.read_until("Forwarding from")
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{local}/through-the-tunnel", timeout=10
                ) as resp:
                    assert json.loads(resp.read())["path"] == "/through-the-tunnel"
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        forward.stop()


# --- scale ----------------------------------------------------------------------------------------------


def replicas(sandbox: Sandbox) -> int:
    got = run_kubectl(sandbox.kubeconfig, "get", "deployment", "web", "-n", "prod", "-o", "json", check=True)
    return json.loads(got.stdout)["spec"]["replicas"]


async def test_scale_is_refused_and_works_without_the_rule(gw, cluster, guarded, unguarded):
    before = replicas(cluster)
    since = last_id(cluster)
    refused = run_kubectl(guarded, "scale", "deployment/web", "-n", "prod", "--replicas=0")
    assert refused.returncode != 0 and "refused by scaling-in-prod" in refused.stderr, refused.stderr
    for method, path, body in (
        ("PUT", "/apis/apps/v1/namespaces/prod/deployments/web/scale",
         {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web", "namespace": "prod"},
          "spec": {"replicas": 0}}),
        ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/web/%73cale", {"spec": {"replicas": 0}}),
    ):  # fmt: skip
        ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
        status, answer = await send(gw, "guarded", method, path, json.dumps(body).encode(), ctype)
        assert_refused(status, answer, "scaling-in-prod")
    assert [p for p in reached(cluster, since, "scale") if not p.startswith("GET")] == []
    assert replicas(cluster) == before

    done = run_kubectl(unguarded, "scale", "deployment/web", "-n", "prod", "--replicas=5")
    assert done.returncode == 0, done.stderr
    assert replicas(cluster) == 5
