"""The sandbox cluster, driven directly by real kubectl (both binaries) and the official Python client.

The sandbox is the stand-in kube-apiserver for every gateway test, so these tests pin the wire behaviour
kubectl relies on: discovery, tables, protobuf request bodies, apply/patch, watch, logs, errors,
impersonation and the request log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kubetest import Background, kubectl_binaries, run_kubectl

from kubegate.sandbox.runtime import configured_isolation

BINARIES = kubectl_binaries()
# Pod processes run only confined (sandbox/runtime.py); where nothing can confine them they fail closed.
needs_isolation = pytest.mark.skipif(
    configured_isolation() is None,
    reason="pods cannot be confined here: no proot and no user namespaces (they fail closed)",
)


def short(binary: str) -> str:
    return "system" if binary == "/usr/bin/kubectl" else "wheel"


@pytest.fixture(params=BINARIES, ids=[short(b) for b in BINARIES])
def kubectl(request, sandbox):
    """A kubectl runner for one binary against the sandbox directly."""

    def run(*args: str, **kwargs):
        return run_kubectl(sandbox.kubeconfig, *args, kubectl=request.param, **kwargs)

    run.binary = request.param  # type: ignore[attr-defined]
    return run


@pytest.fixture
def namespace(kubectl):
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, check=True)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def raw(sandbox, path: str, *, method: str = "GET", token: str | None = "admin", headers=None, body=None):
    """A plain HTTPS request to the sandbox; returns (status, headers, body bytes)."""
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
    req = urllib.request.Request(
        f"{sandbox.url}{path}", method=method, data=body, headers=dict(headers or {})
    )
    if token == "admin":
        req.add_header("Authorization", f"Bearer {sandbox.token}")
    elif token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


# --- discovery and reads -------------------------------------------------------------------------------


def test_version(kubectl):
    proc = kubectl("version", "-o", "json", check=True)
    server = json.loads(proc.stdout)["serverVersion"]
    assert server["gitVersion"].endswith("-sandbox") and server["major"] == "1"


def test_api_resources(kubectl):
    proc = kubectl("api-resources", check=True)
    lines = proc.stdout.splitlines()
    for expected in ("pods ", "deployments ", "selfsubjectreviews ", "cronjobs "):
        assert any(line.startswith(expected) for line in lines), expected
    assert any(line.startswith("deployments") and "deploy" in line and "apps/v1" in line for line in lines)


def test_aggregated_discovery_is_served(sandbox):
    accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    status, headers, body = raw(sandbox, "/apis", headers={"Accept": accept})
    assert status == 200
    assert "as=APIGroupDiscoveryList" in headers["Content-Type"]
    doc = json.loads(body)
    assert doc["kind"] == "APIGroupDiscoveryList"
    assert "apps" in [item["metadata"]["name"] for item in doc["items"]]
    status, headers, body = raw(sandbox, "/api", headers={"Accept": "application/json"})
    assert json.loads(body)["kind"] == "APIVersions"


@needs_isolation
def test_get_pods_table(kubectl):
    proc = kubectl("get", "pods", "-n", "prod", check=True)
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    web = next(r for r in rows if r.split()[0] == "web")
    assert web.split()[1:3] == ["1/1", "Running"]


def test_get_pods_wide(kubectl):
    proc = kubectl("get", "pods", "-n", "prod", "-o", "wide", check=True)
    assert "IP" in proc.stdout.splitlines()[0] and "NODE" in proc.stdout.splitlines()[0]
    assert "10.244." in proc.stdout and "sandbox-node" in proc.stdout


def test_get_pod_yaml_and_json(kubectl):
    doc = yaml.safe_load(kubectl("get", "pod", "web", "-n", "prod", "-o", "yaml", check=True).stdout)
    assert doc["kind"] == "Pod" and doc["metadata"]["resourceVersion"]
    assert doc["status"]["phase"] == "Running"
    obj = json.loads(kubectl("get", "pod", "web", "-n", "prod", "-o", "json", check=True).stdout)
    assert obj["metadata"]["uid"] == doc["metadata"]["uid"]
    assert obj["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "db-credentials"


def test_get_secrets_table(kubectl):
    proc = kubectl("get", "secrets", "-n", "prod", check=True)
    assert proc.stdout.splitlines()[0].split() == ["NAME", "TYPE", "DATA", "AGE"]
    assert "db-credentials" in proc.stdout and "Opaque" in proc.stdout


def test_describe_pod(kubectl):
    proc = kubectl("describe", "pod", "web", "-n", "prod", check=True)
    assert "Status:           Running" in proc.stdout
    assert "<set to the key 'password' in secret 'db-credentials'>" in proc.stdout
    assert "Successfully assigned prod/web to sandbox-node" in proc.stdout  # events by fieldSelector


def test_get_all_and_selectors(kubectl):
    proc = kubectl("get", "all", "-n", "prod", check=True)
    assert "deployment.apps/web" in proc.stdout and "service/web" in proc.stdout
    names = kubectl(
        "get", "pods", "-n", "prod", "-l", "app in (worker)", "-o", "name", check=True
    ).stdout.split()
    assert names == ["pod/worker"]
    names = kubectl("get", "pods", "-n", "prod", "--field-selector", "metadata.name=web", "-o", "name").stdout
    assert names.split() == ["pod/web"]


def test_list_pagination(sandbox):
    status, _, body = raw(sandbox, "/api/v1/namespaces/prod/pods?limit=2")
    page = json.loads(body)
    assert status == 200 and len(page["items"]) == 2 and page["metadata"]["continue"]
    assert page["metadata"]["remainingItemCount"] >= 1
    _, _, body = raw(sandbox, f"/api/v1/namespaces/prod/pods?limit=2&continue={page['metadata']['continue']}")
    rest = json.loads(body)["items"]
    names = [p["metadata"]["name"] for p in page["items"] + rest]
    assert names == sorted(set(names)) and "worker" in names


# --- writes --------------------------------------------------------------------------------------------


def test_create_namespace_secret_configmap_from_protobuf(kubectl, namespace, sandbox):
    since = last_id(sandbox)
    kubectl(
        "create",
        "secret",
        "generic",
        "creds",
        "-n",
        namespace,
        "--from-literal=password=p@ss w0rd",
        "--from-literal=user=me",
        check=True,
    )
    data = json.loads(kubectl("get", "secret", "creds", "-n", namespace, "-o", "json", check=True).stdout)[
        "data"
    ]
    assert base64.b64decode(data["password"]) == b"p@ss w0rd"
    assert base64.b64decode(data["user"]) == b"me"
    kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=k=v", check=True)
    cm = json.loads(kubectl("get", "configmap", "cfg", "-n", namespace, "-o", "json", check=True).stdout)
    assert cm["data"] == {"k": "v"}
    posts = [r for r in sandbox.requests_log(since) if r["method"] == "POST"]
    # kubectl's generators really did send protobuf (what makes this test meaningful)
    assert any(
        "application/vnd.kubernetes.protobuf" in r["headers"].get("content-type", [""])[0] for r in posts
    )


def test_create_deployment_and_service_from_protobuf(kubectl, namespace):
    kubectl(
        "create",
        "deployment",
        "d1",
        "-n",
        namespace,
        "--image=nginx:1.25",
        "--replicas=2",
        "--port=80",
        check=True,
    )
    dep = json.loads(kubectl("get", "deploy", "d1", "-n", namespace, "-o", "json", check=True).stdout)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 80
    assert dep["spec"]["selector"]["matchLabels"] == {"app": "d1"}
    kubectl("create", "service", "clusterip", "s1", "-n", namespace, "--tcp=80:8080", check=True)
    svc = json.loads(kubectl("get", "svc", "s1", "-n", namespace, "-o", "json", check=True).stdout)
    assert svc["spec"]["ports"][0]["targetPort"] == 8080 and svc["spec"]["clusterIP"].startswith("10.96.")


def test_create_twice_is_already_exists(kubectl, namespace):
    manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dup"}})
    kubectl("create", "-n", namespace, "-f", "-", input=manifest, check=True)
    again = kubectl("create", "-n", namespace, "-f", "-", input=manifest)
    assert again.returncode == 1
    assert (
        'Error from server (AlreadyExists): error when creating "STDIN": configmaps "dup" already exists'
        in (again.stderr)
    )


def test_apply_create_then_update(kubectl, namespace):
    def manifest(replicas: int, value: str) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "api", "namespace": namespace},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": "api"}},
                    "template": {
                        "metadata": {"labels": {"app": "api"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "api",
                                    "image": "example/api:1",
                                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": value}],
                                }
                            ]
                        },
                    },
                },
            }
        )

    first = kubectl("apply", "-f", "-", input=manifest(1, "x"), check=True)
    assert "deployment.apps/api created" in first.stdout, first.stderr
    dep = json.loads(kubectl("get", "deploy", "api", "-n", namespace, "-o", "json", check=True).stdout)
    last_applied = json.loads(
        dep["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    )
    assert last_applied["spec"]["replicas"] == 1
    second = kubectl("apply", "-f", "-", input=manifest(3, "v2"), check=True)
    assert "deployment.apps/api configured" in second.stdout
    assert "warning" not in second.stderr.lower(), second.stderr
    dep = json.loads(kubectl("get", "deploy", "api", "-n", namespace, "-o", "json", check=True).stdout)
    assert dep["spec"]["replicas"] == 3 and dep["metadata"]["generation"] == 2
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"}, {"name": "B", "value": "v2"}]
    third = kubectl("apply", "-f", "-", input=manifest(3, "v2"), check=True)
    assert "unchanged" in third.stdout


def test_server_side_apply(kubectl, namespace):
    manifest = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "ssa", "namespace": namespace},
            "data": {"a": "1"},
        }
    )
    assert (
        "serverside-applied"
        in kubectl("apply", "--server-side", "-f", "-", input=manifest, check=True).stdout
    )
    out = kubectl("get", "cm", "ssa", "-n", namespace, "-o", "jsonpath={.data.a}", check=True)
    assert out.stdout == "1"


def test_patch_types_label_annotate(kubectl, namespace):
    kubectl("create", "deployment", "p", "-n", namespace, "--image=busybox:1", check=True)
    kubectl(
        "patch",
        "deploy",
        "p",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        '{"spec":{"replicas":3}}',
        check=True,
    )
    kubectl(
        "patch",
        "deploy",
        "p",
        "-n",
        namespace,
        "--type",
        "strategic",
        "-p",
        '{"spec":{"template":{"spec":{"containers":[{"name":"busybox","image":"busybox:2"}]}}}}',
        check=True,
    )
    kubectl(
        "patch",
        "deploy",
        "p",
        "-n",
        namespace,
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/spec/replicas","value":3},{"op":"replace","path":"/spec/replicas","value":4}]',
        check=True,
    )
    dep = json.loads(kubectl("get", "deploy", "p", "-n", namespace, "-o", "json", check=True).stdout)
    assert dep["spec"]["replicas"] == 4
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1 and containers[0]["image"] == "busybox:2"  # merged by name, not replaced
    failed = kubectl(
        "patch",
        "deploy",
        "p",
        "-n",
        namespace,
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/spec/replicas","value":9}]',
    )
    assert failed.returncode == 1 and "The request is invalid" in failed.stderr
    kubectl("label", "deploy", "p", "-n", namespace, "tier=web", check=True)
    kubectl("annotate", "deploy", "p", "-n", namespace, "note=hello", check=True)
    meta = json.loads(kubectl("get", "deploy", "p", "-n", namespace, "-o", "json", check=True).stdout)[
        "metadata"
    ]
    assert meta["labels"]["tier"] == "web" and meta["annotations"]["note"] == "hello"


def test_delete_and_missing(kubectl, namespace):
    kubectl("create", "configmap", "gone", "-n", namespace, check=True)
    proc = kubectl("delete", "configmap", "gone", "-n", namespace, check=True)
    assert 'configmap "gone" deleted' in proc.stdout
    missing = kubectl("delete", "pod", "nope", "-n", namespace)
    assert missing.returncode == 1
    assert 'Error from server (NotFound): pods "nope" not found' in missing.stderr


def test_invalid_name_and_missing_namespace(sandbox):
    body = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}}).encode()
    status, _, out = raw(
        sandbox,
        "/api/v1/namespaces/dev/configmaps",
        method="POST",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    doc = json.loads(out)
    assert status == 422 and doc["reason"] == "Invalid"
    assert doc["details"]["causes"][0]["field"] == "metadata.name"
    status, _, out = raw(
        sandbox,
        "/api/v1/namespaces/nowhere/configmaps",
        method="POST",
        body=body.replace(b"Bad_Name", b"ok"),
        headers={"Content-Type": "application/json"},
    )
    assert status == 404 and json.loads(out)["message"] == 'namespaces "nowhere" not found'


def test_update_conflict_and_dry_run(sandbox):
    _, _, body = raw(sandbox, "/api/v1/namespaces/prod/configmaps/app-config")
    cm = json.loads(body)
    stale = dict(cm, metadata=dict(cm["metadata"], resourceVersion="1"))
    status, _, out = raw(
        sandbox,
        "/api/v1/namespaces/prod/configmaps/app-config",
        method="PUT",
        body=json.dumps(stale).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 409 and json.loads(out)["reason"] == "Conflict"
    assert "the object has been modified" in json.loads(out)["message"]
    status, _, out = raw(sandbox, "/api/v1/namespaces/prod/pods/web?dryRun=All", method="DELETE")
    assert status == 200
    status, _, _ = raw(sandbox, "/api/v1/namespaces/prod/pods/web")
    assert status == 200


def test_secret_string_data_is_merged_and_not_stored(sandbox):
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sd"}, "stringData": {"k": "plain"}}
    status, _, out = raw(
        sandbox,
        "/api/v1/namespaces/dev/secrets",
        method="POST",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    doc = json.loads(out)
    assert status == 201 and "stringData" not in doc and base64.b64decode(doc["data"]["k"]) == b"plain"


def test_body_too_large_is_413(sandbox):
    big = b'{"metadata":{"name":"x"},"data":{"k":"' + b"a" * (3 * 1024 * 1024 + 10) + b'"}}'
    status, _, out = raw(
        sandbox,
        "/api/v1/namespaces/dev/configmaps",
        method="POST",
        body=big,
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and json.loads(out)["reason"] == "RequestEntityTooLarge"


# --- watch and logs ------------------------------------------------------------------------------------


def test_get_watch_sees_a_new_pod(kubectl, namespace, sandbox):
    watch = Background([kubectl.binary, "get", "pods", "-w", "-n", namespace], sandbox.kubeconfig)
    try:
        time.sleep(1.0)  # let the list + watch start
        kubectl("run", "w1", "-n", namespace, "--image=busybox", "--", "sleep", "60", check=True)
        match = watch.read_until(r"w1\s+\d/1\s+\w+", timeout=20)
        assert match
    finally:
        watch.stop()


def test_watch_events_are_tables_for_kubectl(sandbox):
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
    req = urllib.request.Request(
        f"{sandbox.url}/api/v1/namespaces/prod/pods?watch=true&timeoutSeconds=1",
        headers={"Authorization": f"Bearer {sandbox.token}", "Accept": accept},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert events and all(e["type"] == "ADDED" and e["object"]["kind"] == "Table" for e in events)
    assert events[0]["object"]["columnDefinitions"] and not events[-1]["object"]["columnDefinitions"]
    assert events[0]["object"]["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


@needs_isolation
def test_logs_tail(kubectl):
    proc = kubectl("logs", "web", "-n", "prod", "--tail=2", check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert all("postgres://app:hunter2-prod-s3cret@db:5432/app" in line for line in lines)
    bad = kubectl("logs", "web", "-n", "prod", "-c", "nope")
    assert bad.returncode == 1 and "container nope is not valid for pod web" in bad.stderr


@needs_isolation
def test_logs_follow(kubectl, sandbox):
    follow = Background([kubectl.binary, "logs", "-f", "web", "-n", "prod", "--tail=1"], sandbox.kubeconfig)
    try:
        follow.read_until(r"request \d+ served", timeout=10)
        follow.read_until(r"request \d+ served", timeout=10)  # a new line arrives while held open
        assert follow.alive()
    finally:
        follow.stop()


# --- identity ------------------------------------------------------------------------------------------


def test_whoami_and_can_i(kubectl):
    info = json.loads(kubectl("auth", "whoami", "-o", "json", check=True).stdout)["status"]["userInfo"]
    assert info["username"] == "kubegate-admin" and "system:authenticated" in info["groups"]
    assert kubectl("auth", "can-i", "delete", "pods", "-n", "prod").stdout.strip() == "yes"
    denied = kubectl("--as", "bob", "--as-group", "readonly", "auth", "can-i", "delete", "pods", "-n", "prod")
    assert denied.stdout.strip() == "no" and denied.returncode == 1
    allowed = kubectl("--as", "bob", "--as-group", "readonly", "auth", "can-i", "list", "pods", "-n", "prod")
    assert allowed.stdout.strip() == "yes"
    who = kubectl("--as", "bob", "--as-group", "readonly", "auth", "whoami", "-o", "json", check=True)
    assert json.loads(who.stdout)["status"]["userInfo"]["groups"] == ["readonly", "system:authenticated"]


def test_readonly_impersonated_delete_is_forbidden_and_recorded(kubectl, sandbox):
    since = last_id(sandbox)
    proc = kubectl("--as", "bob", "--as-group", "readonly", "delete", "pod", "web", "-n", "prod")
    assert proc.returncode == 1
    assert (
        'Error from server (Forbidden): pods "web" is forbidden: User "bob" cannot delete resource "pods" in API '
        'group "" in the namespace "prod"'
    ) in proc.stderr
    records = [r for r in sandbox.requests_log(since) if r["method"] == "DELETE"]
    assert records and records[-1]["status"] == 403
    record = records[-1]
    assert record["user"] == "bob" and record["authenticated_as"] == "kubegate-admin"
    assert record["impersonate_user"] == "bob" and record["impersonate_groups"] == ["readonly"]
    assert record["authorization_sha256"] == hashlib.sha256(sandbox.token.encode()).hexdigest()
    assert record["headers"]["authorization"] == [f"sha256:{record['authorization_sha256']}"]
    assert record["headers"]["kubectl-command"] == ["kubectl delete"]


def test_impersonation_extra_and_uid(sandbox):
    headers = {"Impersonate-User": "carol", "Impersonate-Uid": "u-1", "Impersonate-Extra-Scopes%2FA": "x"}
    status, _, body = raw(
        sandbox,
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        method="POST",
        headers={**headers, "Content-Type": "application/json"},
        body=b'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}',
    )
    info = json.loads(body)["status"]["userInfo"]
    assert status == 201 and info["username"] == "carol" and info["uid"] == "u-1"
    assert info["extra"] == {"scopes/a": ["x"]}
    status, _, _ = raw(sandbox, "/api/v1/pods", headers={"Impersonate-Group": "g"})
    assert status == 500  # what the apiserver answers to groups without a user


def test_unauthenticated_is_401(sandbox):
    for token in (None, "wrong"):
        status, _, body = raw(sandbox, "/api/v1/namespaces/prod/pods", token=token)
        assert status == 401
        assert json.loads(body) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }


def test_client_certificate_authenticates(sandbox):
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
    ctx.load_cert_chain(str(sandbox.dir / "client.crt"), str(sandbox.dir / "client.key"))
    req = urllib.request.Request(
        f"{sandbox.url}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        method="POST",
        data=b'{"kind":"SelfSubjectReview","apiVersion":"authentication.k8s.io/v1"}',
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert json.loads(resp.read())["status"]["userInfo"]["username"] == "kubegate-gateway"


@needs_isolation
def test_exec_over_spdy_like_the_api_server(sandbox):
    """kubectl's SPDY path (its fallback when a WebSocket upgrade is refused) works too, as on a real
    API server; exec into a missing pod is a 404 either way."""
    proc = run_kubectl(
        sandbox.kubeconfig, "exec", "web", "-n", "prod", "--", "echo", "over-spdy",
        env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "over-spdy\n"
    status, _, _ = raw(
        sandbox,
        "/api/v1/namespaces/prod/pods/nope/exec?command=true",
        method="POST",
        headers={"Upgrade": "SPDY/3.1", "Connection": "Upgrade"},
    )
    assert status == 404


# --- the official Python client ------------------------------------------------------------------------


def test_kubernetes_python_client(sandbox):
    from kubernetes import client, config, watch

    api_client = config.new_client_from_config(str(sandbox.kubeconfig))
    v1 = client.CoreV1Api(api_client)
    names = [p.metadata.name for p in v1.list_namespaced_pod("prod").items]
    assert {"web", "worker"} <= set(names)
    seen = []
    started = time.monotonic()
    for event in watch.Watch().stream(v1.list_namespaced_pod, "prod", timeout_seconds=2):
        seen.append((event["type"], event["object"].metadata.name))
    assert ("ADDED", "web") in seen and time.monotonic() - started < 10
    secret = v1.read_namespaced_secret("db-credentials", "prod")
    assert base64.b64decode(secret.data["password"]) == b"hunter2-prod-s3cret"


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


def test_can_i_list(kubectl):
    proc = kubectl(
        "--as", "bob", "--as-group", "readonly", "auth", "can-i", "--list", "-n", "prod", check=True
    )
    assert "[get list watch]" in proc.stdout


# --- lifecycle -----------------------------------------------------------------------------------------


async def test_start_sandbox_in_process(tmp_path):
    """`kubegate demo` runs the sandbox in its own event loop through start_sandbox()."""
    import aiohttp

    from kubegate.sandbox.server import start_sandbox

    handle = await start_sandbox(tmp_path / "sb")
    try:
        ctx = ssl.create_default_context(cafile=str(handle.ca_file))
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {handle.token}"}
            async with session.get(
                f"{handle.url}/api/v1/namespaces/prod/pods/web", headers=headers, ssl=ctx
            ) as r:
                assert r.status == 200
                assert (await r.json())["status"]["phase"] == "Running"
        assert yaml.safe_load(handle.kubeconfig.read_text())["current-context"] == "sandbox"
    finally:
        await handle.close()


@needs_isolation
def test_sigterm_stops_pod_processes(tmp_path):
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "kubegate.sandbox", "serve", "--dir", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["port"] > 0 and Path(info["kubeconfig"]).exists() and Path(info["client_cert"]).exists()
        deadline = time.monotonic() + 10
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            children = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.2)
        assert children, "seeded pods run as child processes"
        proc.terminate()
        assert proc.wait(15) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"pod processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_large_responses_are_gzipped_like_the_apiserver(sandbox, kubectl, namespace):
    import gzip

    manifest = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"k": "x" * 200_000}}
    )
    kubectl("create", "-n", namespace, "-f", "-", input=manifest, check=True)
    status, headers, body = raw(
        sandbox, f"/api/v1/namespaces/{namespace}/configmaps", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(body))["items"][0]["data"]["k"]) == 200_000
    out = kubectl("get", "cm", "big", "-n", namespace, "-o", "jsonpath={.data.k}", check=True)
    assert len(out.stdout) == 200_000


def test_request_log_needs_the_unimpersonated_admin(sandbox):
    status, _, body = raw(sandbox, "/sandbox/requests?since=0", headers={"Impersonate-User": "mallory"})
    assert status == 403 and json.loads(body)["reason"] == "Forbidden"
    status, _, _ = raw(sandbox, "/sandbox/requests?since=0", token=None)
    assert status == 401
    status, _, body = raw(sandbox, "/sandbox/requests?since=0")
    doc = json.loads(body)
    assert status == 200 and doc["next"] >= doc["items"][-1]["id"]
