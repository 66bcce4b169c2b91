"""The sandbox's routes that reach containers or end pods without a delete, driven directly (no gateway) by
real kubectl, the official Python client and plain HTTPS: pods/eviction, pods/ephemeralcontainers
(`kubectl debug`), pods/proxy and services/proxy. They follow the API server's registry code, so that the
gateway tests that deny or hold these routes test them against what a real cluster would do."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest
from kubetest import KUBECTL, PtySession, kubectl_env, run_kubectl
from workload_pods import (
    apply,
    echo_pod,
    echo_ready,
    echo_service,
    eviction_protobuf,
    sleeper_pod,
    wait_for,
)

from kubegate.sandbox.proxy import split_scheme_name_port, upstream_path
from kubegate.sandbox.runtime import configured_isolation

# Pod processes run only confined (sandbox/runtime.py); where nothing can confine them they fail closed.
needs_isolation = pytest.mark.skipif(
    configured_isolation() is None,
    reason="pods cannot be confined here: no proot and no user namespaces (they fail closed)",
)


def raw(sandbox, path: str, *, method: str = "GET", body: bytes | None = None, headers=None):
    """A plain HTTPS request to the sandbox as its admin; (status, headers, body). Redirects not followed."""
    ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    req = urllib.request.Request(
        f"{sandbox.url}{path}", method=method, data=body, headers=dict(headers or {})
    )
    req.add_header("Authorization", f"Bearer {sandbox.token}")
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture(scope="module")
def ns(sandbox):
    name = f"wr-{uuid.uuid4().hex[:8]}"
    run_kubectl(sandbox.kubeconfig, "create", "namespace", name, check=True)
    yield name
    run_kubectl(sandbox.kubeconfig, "delete", "namespace", name, "--wait=false")


def pod_exists(sandbox, ns: str, name: str) -> bool:
    return raw(sandbox, f"/api/v1/namespaces/{ns}/pods/{name}")[0] == 200


def eviction(ns: str, name: str, **extra) -> bytes:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
    return json.dumps({**body, **extra}).encode()


# --- eviction -------------------------------------------------------------------------------------------


def test_eviction_deletes_the_pod_with_a_201_success_status(sandbox, ns):
    apply(sandbox.kubeconfig, sleeper_pod("evictee", ns))
    path = f"/api/v1/namespaces/{ns}/pods/evictee/eviction"
    json_ct = {"Content-Type": "application/json"}
    # dryRun: answered like the real thing, nothing deleted
    status, _, body = raw(
        sandbox, path + "?dryRun=All", method="POST", body=eviction(ns, "evictee"), headers=json_ct
    )
    assert status == 201 and json.loads(body)["status"] == "Success"
    assert pod_exists(sandbox, ns, "evictee")
    # the name in the body must be the pod's
    status, _, body = raw(sandbox, path, method="POST", body=eviction(ns, "other"), headers=json_ct)
    assert status == 400 and "does not match" in json.loads(body)["message"]
    # a stale uid precondition conflicts
    stale = eviction(ns, "evictee", deleteOptions={"preconditions": {"uid": "not-the-uid"}})
    assert raw(sandbox, path, method="POST", body=stale, headers=json_ct)[0] == 409
    assert pod_exists(sandbox, ns, "evictee")

    status, _, body = raw(sandbox, path, method="POST", body=eviction(ns, "evictee"), headers=json_ct)
    assert status == 201, body
    answer = json.loads(body)
    assert answer["kind"] == "Status" and answer["status"] == "Success" and answer["code"] == 201
    assert not pod_exists(sandbox, ns, "evictee")
    status, _, body = raw(sandbox, path, method="POST", body=eviction(ns, "evictee"), headers=json_ct)
    assert status == 404 and json.loads(body)["reason"] == "NotFound"
    # only POST
    assert raw(sandbox, path)[0] == 405


def test_eviction_in_protobuf_as_kubectl_drain_sends_it(sandbox, ns):
    apply(sandbox.kubeconfig, sleeper_pod("drained", ns))
    path = f"/api/v1/namespaces/{ns}/pods/drained/eviction"
    protobuf = {"Content-Type": "application/vnd.kubernetes.protobuf"}
    status, _, body = raw(
        sandbox, path, method="POST", body=eviction_protobuf("drained", ns, dry_run=True), headers=protobuf
    )
    assert status == 201 and pod_exists(sandbox, ns, "drained"), body  # dryRun inside the DeleteOptions
    status, _, body = raw(
        sandbox, path, method="POST", body=eviction_protobuf("drained", ns), headers=protobuf
    )
    assert status == 201 and json.loads(body)["status"] == "Success", body
    assert not pod_exists(sandbox, ns, "drained")


def test_eviction_with_the_official_python_client(sandbox, ns):
    kubernetes = pytest.importorskip("kubernetes")
    apply(sandbox.kubeconfig, sleeper_pod("evicted-by-client", ns))
    client = kubernetes.config.new_client_from_config(config_file=str(sandbox.kubeconfig))
    core = kubernetes.client.CoreV1Api(client)
    body = kubernetes.client.V1Eviction(
        metadata=kubernetes.client.V1ObjectMeta(name="evicted-by-client", namespace=ns)
    )
    core.create_namespaced_pod_eviction("evicted-by-client", ns, body)
    assert not pod_exists(sandbox, ns, "evicted-by-client")


def test_discovery_lists_the_subresources(sandbox):
    _, _, body = raw(sandbox, "/api/v1")
    subs = {r["name"]: r for r in json.loads(body)["resources"]}
    assert subs["pods/eviction"]["group"] == "policy" and subs["pods/eviction"]["verbs"] == ["create"]
    assert set(subs["pods/ephemeralcontainers"]["verbs"]) == {"get", "patch", "update"}
    assert "get" in subs["pods/proxy"]["verbs"] and "create" in subs["services/proxy"]["verbs"]


# --- ephemeral containers (kubectl debug) ---------------------------------------------------------------


@needs_isolation
def test_kubectl_debug_runs_an_ephemeral_container(sandbox, ns):
    apply(sandbox.kubeconfig, sleeper_pod("debuggee", ns))
    debug = run_kubectl(
        sandbox.kubeconfig,
        "debug",
        "debuggee",
        "-n",
        ns,
        "--image=busybox",
        "--",
        "echo",
        "hi from debug",
        check=True,
    )
    name = re.search(r"(debugger-\w+)", debug.stdout + debug.stderr).group(1)
    pod = json.loads(
        run_kubectl(sandbox.kubeconfig, "get", "pod", "debuggee", "-n", ns, "-o", "json", check=True).stdout
    )
    (container,) = pod["spec"]["ephemeralContainers"]
    assert container["name"] == name and container["command"] == ["echo", "hi from debug"]

    def logged() -> bool:
        logs = run_kubectl(sandbox.kubeconfig, "logs", "debuggee", "-n", ns, "-c", name)
        return logs.stdout == "hi from debug\n"

    wait_for(logged, what="the debug container's output")

    def terminated() -> bool:
        got = json.loads(raw(sandbox, f"/api/v1/namespaces/{ns}/pods/debuggee")[2])
        statuses = got["status"].get("ephemeralContainerStatuses") or []
        return bool(statuses) and "terminated" in statuses[0]["state"]

    wait_for(terminated, what="the ephemeral container's status")


@needs_isolation
def test_kubectl_debug_interactive_attaches_to_the_new_container(sandbox, ns):
    apply(sandbox.kubeconfig, sleeper_pod("interactive", ns))
    proc = subprocess.run(
        [KUBECTL, "debug", "-i", "interactive", "-n", ns, "--image=busybox", "--", "sh"],
        input="echo sum=$((40+2))\nexit 0\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=kubectl_env(sandbox.kubeconfig),
    )
    assert "sum=42" in proc.stdout, proc.stderr


@needs_isolation
def test_kubectl_debug_it_gets_a_shell_on_a_terminal(sandbox, ns):
    """`kubectl debug -it POD --image=busybox`: no command, so the image's shell, attached on a tty."""
    apply(sandbox.kubeconfig, sleeper_pod("on-a-tty", ns))
    session = PtySession(
        ["kubectl", "debug", "-it", "on-a-tty", "-n", ns, "--image=busybox"], sandbox.kubeconfig
    )
    try:
        session.expect("try pressing enter")  # kubectl attaches once the container runs
        session.send("\r")
        session.expect("[#$] ")  # the shell's prompt
        session.send("echo tty=$(tty | cut -c1-8)-$((6*7))\r")
        session.expect("tty=/dev/pts-42")
        session.send("exit\r")
        assert session.wait(30) == 0
    finally:
        session.close()


def test_ephemeral_containers_can_only_be_added(sandbox, ns):
    apply(sandbox.kubeconfig, sleeper_pod("only-added", ns))
    path = f"/api/v1/namespaces/{ns}/pods/only-added/ephemeralcontainers"
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    patch = {
        "spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox", "command": ["sleep", "60"]}]}
    }
    status, _, body = raw(sandbox, path, method="PATCH", body=json.dumps(patch).encode(), headers=smp)
    assert status == 200, body
    pod = json.loads(body)
    assert [c["name"] for c in pod["spec"]["ephemeralContainers"]] == ["dbg"]
    # removing or changing it through a PUT of the whole list is refused
    pod["spec"]["ephemeralContainers"] = []
    status, _, body = raw(
        sandbox,
        path,
        method="PUT",
        body=json.dumps(pod).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 422 and "may not be removed" in json.loads(body)["message"]
    # a name of a regular container is taken; ports are not allowed
    for bad in (
        {"name": "main", "image": "busybox"},
        {"name": "p", "image": "busybox", "ports": [{"containerPort": 1}]},
    ):
        status, _, _ = raw(
            sandbox,
            path,
            method="PATCH",
            body=json.dumps({"spec": {"ephemeralContainers": [bad]}}).encode(),
            headers=smp,
        )
        assert status == 422
    # the pod itself cannot carry new ephemeral containers (only the subresource adds them)
    sneak = {"spec": {"ephemeralContainers": [{"name": "sneak", "image": "busybox"}]}}
    status, _, _ = raw(sandbox, f"/api/v1/namespaces/{ns}/pods/only-added", method="PATCH",
                       body=json.dumps(sneak).encode(), headers=smp)  # fmt: skip
    assert status == 422
    status, _, body = raw(sandbox, path)
    assert status == 200 and [c["name"] for c in json.loads(body)["spec"]["ephemeralContainers"]] == ["dbg"]


# --- pods/proxy and services/proxy ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo(sandbox, ns):
    if configured_isolation() is None:
        pytest.skip("pods cannot be confined here: no proot and no user namespaces (they fail closed)")
    apply(sandbox.kubeconfig, echo_pod("echo", ns), echo_service("echo", ns))
    echo_ready(sandbox.kubeconfig, ns, "echo")
    return ns


def test_pod_proxy_reaches_the_pods_server_with_path_and_raw_query(sandbox, echo):
    base = f"/api/v1/namespaces/{echo}/pods/echo/proxy"
    for name in ("echo", "echo:8000", "http:echo:8000"):
        status, _, body = raw(sandbox, f"/api/v1/namespaces/{echo}/pods/{name}/proxy/a/b/?x=1&y=%2F+z&x=2")
        assert status == 200, body
        seen = json.loads(body)
        assert seen["path"] == "/a/b/?x=1&y=%2F+z&x=2"  # the raw query, byte for byte
        assert "authorization" not in seen["headers"]  # the caller's credential stays in the API server
    status, _, body = raw(sandbox, base + "/a%2Bb%20c")
    assert (
        status == 200 and json.loads(body)["path"] == "/a+b%20c"
    )  # decoded as Go does, re-escaped as Go does
    status, _, body = raw(sandbox, base + "/x/../../../etc/passwd")
    assert status == 200 and json.loads(body)["path"] == "/etc/passwd"  # cleaned, never above the root
    status, _, body = raw(sandbox, base + "/submit", method="POST", body=b"payload",
                          headers={"Content-Type": "text/plain"})  # fmt: skip
    seen = json.loads(body)
    assert status == 200 and seen["method"] == "POST" and seen["body"] == "payload"
    for method in ("HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"):
        status, headers, body = raw(
            sandbox, base + "/m", method=method, body=b"" if method != "HEAD" else None
        )
        if method == "HEAD":
            assert status == 501  # the echo server's own answer (it has no do_HEAD), passed on
        else:
            assert status == 200 and json.loads(body)["method"] == method, (method, body)
    status, headers, _ = raw(sandbox, base + "?q=1")
    assert status == 301 and headers["Location"].endswith("/pods/echo/proxy/?q=1")


def test_pod_proxy_with_kubectl_and_the_runtimes_own_answer(sandbox, echo):
    got = run_kubectl(
        sandbox.kubeconfig, "get", "--raw", f"/api/v1/namespaces/{echo}/pods/echo/proxy/k?a=b", check=True
    )
    assert json.loads(got.stdout)["path"] == "/k?a=b"
    seeded = run_kubectl(
        sandbox.kubeconfig, "get", "--raw", "/api/v1/namespaces/prod/pods/web/proxy/", check=True
    )
    assert seeded.stdout.strip() == "hello from web:8080"  # nothing of its own listens: the runtime answers


def test_pod_proxy_errors(sandbox, echo):
    status, _, body = raw(sandbox, f"/api/v1/namespaces/{echo}/pods/echo:9999/proxy/")
    assert status == 503 and "error trying to reach service" in json.loads(body)["message"]
    assert raw(sandbox, f"/api/v1/namespaces/{echo}/pods/missing/proxy/")[0] == 404
    assert raw(sandbox, f"/api/v1/namespaces/{echo}/pods/a:b:c:d/proxy/")[0] == 400
    assert raw(sandbox, f"/api/v1/namespaces/{echo}/pods/echo/proxy/", method="TRACE")[0] == 405


def test_service_proxy_picks_a_pod_of_the_selector(sandbox, echo):
    for name in ("echo:80", "echo:http", "http:echo:80"):
        status, _, body = raw(sandbox, f"/api/v1/namespaces/{echo}/services/{name}/proxy/s?t=1")
        assert status == 200, body
        assert json.loads(body)["path"] == "/s?t=1"
    # an unnamed request matches only an unnamed service port (the API server's lookup)
    status, _, body = raw(sandbox, f"/api/v1/namespaces/{echo}/services/echo/proxy/")
    assert status == 503 and "no endpoints available" in json.loads(body)["message"]
    status, _, body = raw(sandbox, f"/api/v1/namespaces/{echo}/services/echo:81/proxy/")
    assert status == 503 and "no service port 81" in json.loads(body)["message"]
    got = run_kubectl(
        sandbox.kubeconfig, "get", "--raw", f"/api/v1/namespaces/{echo}/services/echo:http/proxy/", check=True
    )
    assert json.loads(got.stdout)["method"] == "GET"


def test_service_proxy_with_a_numeric_target_port(sandbox):
    """The seeded prod/web service (port 80 → targetPort 8080) reaches a web pod, whose runtime answers."""
    status, _, body = raw(sandbox, "/api/v1/namespaces/prod/services/web:80/proxy/")
    assert status == 200 and body.decode().startswith("hello from web"), body


def test_name_and_path_helpers():
    assert split_scheme_name_port("web") == ("", "web", "")
    assert split_scheme_name_port("web:8080") == ("", "web", "8080")
    assert split_scheme_name_port("https:web:443") == ("https", "web", "443")
    assert split_scheme_name_port("ftp:web:21") is None and split_scheme_name_port(":80") is None
    assert upstream_path("/api/v1/namespaces/n/pods/p/proxy", 8) == ""
    assert upstream_path("/api/v1/namespaces/n/pods/p/proxy/", 8) == "/"
    assert upstream_path("/api/v1/namespaces/n/pods/p/proxy/a//b/../c/", 8) == "/a/c/"
