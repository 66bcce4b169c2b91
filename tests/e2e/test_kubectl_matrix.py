"""The kubectl matrix, run three times: against the sandbox directly, through the gateway, and through the
gateway and a `kubegate agent`'s SSH tunnel.

The sandbox is the stand-in API server; passing the same matrix directly is what makes it a fair stand-in,
passing it through the gateway is what makes the gateway transparent to kubectl, and passing it through the
tunnel is what makes a `type: agent` connection as transparent as a direct one.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubetest import Background, PtySession, kubectl_binaries, run_kubectl

from kubegate.core.testing import wait_for


@dataclass
class Target:
    name: str
    kubeconfig: Path
    expected_user: str

    def kubectl(self, *args: str, **kwargs):
        return run_kubectl(self.kubeconfig, *args, **kwargs)


@pytest.fixture(scope="module", params=["direct", "gateway", "agent"])
def target(request, sandbox) -> Target:
    if request.param == "direct":
        return Target("direct", sandbox.kubeconfig, "kubegate-admin")
    if request.param == "agent":  # through the gateway and a `kubegate agent`'s SSH tunnel
        stack = request.getfixturevalue("agent_gateway")
        return Target("agent", stack.kubeconfig("alice"), "alice")
    gateway = request.getfixturevalue("gateway")
    return Target("gateway", gateway.kubeconfig("alice"), "alice")


@pytest.fixture(scope="module")
def namespace(target: Target) -> str:
    name = f"m-{target.name}-{uuid.uuid4().hex[:6]}"
    target.kubectl("create", "namespace", name, check=True)
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kubectl", kubectl_binaries())
def test_version_and_discovery(target: Target, kubectl: str):
    proc = run_kubectl(target.kubeconfig, "version", "-o", "json", kubectl=kubectl, check=True)
    assert json.loads(proc.stdout)["serverVersion"]["gitVersion"].startswith("v1.")
    proc = run_kubectl(target.kubeconfig, "api-resources", kubectl=kubectl, check=True)
    for resource in ("pods", "secrets", "deployments", "namespaces"):
        assert resource in proc.stdout


@pytest.mark.needs_pods
@pytest.mark.parametrize("kubectl", kubectl_binaries())
def test_get_prints_server_side_tables(target: Target, kubectl: str):
    proc = run_kubectl(target.kubeconfig, "get", "pods", "-n", "prod", kubectl=kubectl, check=True)
    header = proc.stdout.splitlines()[0].split()
    assert header[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert any(line.startswith("web ") and "Running" in line for line in proc.stdout.splitlines())
    wide = target.kubectl("get", "pods", "-n", "prod", "-o", "wide", check=True)
    assert "IP" in wide.stdout.splitlines()[0]


def test_get_object_yaml_json_describe(target: Target):
    pod = json.loads(target.kubectl("get", "pod", "web", "-n", "prod", "-o", "json", check=True).stdout)
    assert pod["metadata"]["name"] == "web" and pod["metadata"]["resourceVersion"]
    doc = yaml.safe_load(
        target.kubectl("get", "secret", "db-credentials", "-n", "prod", "-o", "yaml", check=True).stdout
    )
    assert doc["kind"] == "Secret" and "password" in doc["data"]
    described = target.kubectl("describe", "pod", "web", "-n", "prod", check=True).stdout
    assert "Name:" in described and "web" in described


def test_create_from_generators_sends_protobuf(target: Target, namespace: str):
    """kubectl's generators POST protobuf bodies: they must arrive intact."""
    target.kubectl(
        "create", "secret", "generic", "s1", "--from-literal=password=p@ss", "-n", namespace, check=True
    )
    data = target.kubectl(
        "get", "secret", "s1", "-n", namespace, "-o", "jsonpath={.data.password}", check=True
    )
    assert base64.b64decode(data.stdout) == b"p@ss"
    target.kubectl("create", "configmap", "c1", "--from-literal=k=v", "-n", namespace, check=True)
    value = target.kubectl("get", "configmap", "c1", "-n", namespace, "-o", "jsonpath={.data.k}", check=True)
    assert value.stdout == "v"
    again = target.kubectl("create", "configmap", "c1", "--from-literal=k=v", "-n", namespace)
    assert again.returncode == 1
    # kubectl's generators word it their own way: "error: failed to create configmap: ... already exists"
    assert 'configmaps "c1" already exists' in again.stderr


def test_apply_create_then_update(target: Target, namespace: str, tmp_path: Path):
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "applied", "namespace": namespace},
        "data": {"color": "blue"},
    }
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump(manifest))
    first = target.kubectl("apply", "-f", str(path), check=True)
    assert "configmap/applied created" in first.stdout
    manifest["data"]["color"] = "green"
    path.write_text(yaml.safe_dump(manifest))
    second = target.kubectl("apply", "-f", str(path), check=True)
    assert "configmap/applied configured" in second.stdout
    got = json.loads(
        target.kubectl("get", "configmap", "applied", "-n", namespace, "-o", "json", check=True).stdout
    )
    assert got["data"]["color"] == "green"
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]


def test_patch_merge_strategic_json(target: Target, namespace: str):
    target.kubectl("create", "configmap", "p1", "--from-literal=a=1", "-n", namespace, check=True)
    target.kubectl(
        "patch", "configmap", "p1", "-n", namespace, "--type", "merge", "-p", '{"data":{"b":"2"}}', check=True
    )
    target.kubectl(
        "patch",
        "configmap",
        "p1",
        "-n",
        namespace,
        "--type",
        "strategic",
        "-p",
        '{"data":{"c":"3"}}',
        check=True,
    )
    target.kubectl(
        "patch", "configmap", "p1", "-n", namespace, "--type", "json",
        "-p", '[{"op":"remove","path":"/data/a"}]', check=True,
    )  # fmt: skip
    data = json.loads(
        target.kubectl("get", "configmap", "p1", "-n", namespace, "-o", "json", check=True).stdout
    )["data"]
    assert data == {"b": "2", "c": "3"}
    bad = target.kubectl(
        "patch",
        "configmap",
        "p1",
        "-n",
        namespace,
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/data/b","value":"9"}]',
    )
    assert bad.returncode == 1 and "The request is invalid" in bad.stderr  # a failed `test` op is a 422


def test_delete_and_not_found(target: Target, namespace: str):
    target.kubectl("create", "configmap", "gone", "--from-literal=a=1", "-n", namespace, check=True)
    proc = target.kubectl("delete", "configmap", "gone", "-n", namespace, check=True)
    assert 'configmap "gone" deleted' in proc.stdout
    missing = target.kubectl("delete", "configmap", "gone", "-n", namespace)
    assert missing.returncode == 1
    assert 'Error from server (NotFound): configmaps "gone" not found' in missing.stderr


def test_watch_sees_new_objects(target: Target, namespace: str):
    watch = Background(["kubectl", "get", "configmaps", "-n", namespace, "-w"], target.kubeconfig)
    try:
        time.sleep(1)
        target.kubectl("create", "configmap", "watched", "--from-literal=a=1", "-n", namespace, check=True)
        watch.read_until(r"watched\s+1\s+")
        assert watch.alive()
    finally:
        watch.stop()


@pytest.mark.needs_pods
def test_logs_tail_and_follow(target: Target):
    # A fresh sandbox's pod may have written one line so far: wait for a third, then ask for two.
    wait_for(
        lambda: len(target.kubectl("logs", "web", "-n", "prod", check=True).stdout.splitlines()) >= 3,
        "the web pod's third log line",
        timeout=30,
        interval=0.5,
    )
    proc = target.kubectl("logs", "web", "-n", "prod", "--tail=2", check=True)
    assert len(proc.stdout.splitlines()) == 2
    follow = Background(["kubectl", "logs", "-f", "web", "-n", "prod", "--tail=1"], target.kubeconfig)
    try:
        follow.read_until(r"postgres://")
        follow.read_until(r"postgres://", timeout=10)  # a new line arrives while following
    finally:
        follow.stop()


@pytest.mark.needs_pods
def test_exec_output_stdin_and_exit_codes(target: Target):
    proc = target.kubectl("exec", "web", "-n", "prod", "--", "echo", "hello", check=True)
    assert proc.stdout == "hello\n"
    proc = target.kubectl("exec", "web", "-n", "prod", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert proc.returncode == 3
    assert proc.stdout == "out\n" and "err" in proc.stderr
    proc = target.kubectl(
        "exec", "-i", "web", "-n", "prod", "--", "cat", input="line one\nline two\n", check=True
    )
    assert proc.stdout == "line one\nline two\n"


@pytest.mark.needs_pods
def test_exec_interactive_tty(target: Target):
    session = PtySession(
        ["kubectl", "exec", "-it", "web", "-n", "prod", "--", "sh"], target.kubeconfig, rows=30, cols=100
    )
    try:
        session.send("echo $((6*7))\n")
        session.expect(r"42")
        session.send("stty size\n")
        session.expect(r"30 100")
        session.resize(40, 120)
        time.sleep(0.5)
        session.send("stty size\n")
        session.expect(r"40 120")
        session.send("exit 4\n")
        assert session.wait() == 4
    finally:
        session.close()


@pytest.mark.needs_pods
def test_cp_both_ways(target: Target, tmp_path: Path):
    local = tmp_path / "upload.txt"
    payload = f"copied {uuid.uuid4()}\n"
    local.write_text(payload)
    remote = f"/tmp/{target.name}-{uuid.uuid4().hex[:6]}.txt"
    target.kubectl("cp", str(local), f"prod/web:{remote}", check=True)
    assert target.kubectl("exec", "web", "-n", "prod", "--", "cat", remote, check=True).stdout == payload
    back = tmp_path / "download.txt"
    target.kubectl("cp", f"prod/web:{remote}", str(back), check=True)
    assert back.read_text() == payload


def test_port_forward_carries_bytes(target: Target):
    port = free_port()
    forward = Background(
        ["kubectl", "port-forward", "pod/web", "-n", "prod", f"{port}:8080"], target.kubeconfig
    )
    try:
        forward.read_until(r"Forwarding from 127\.0\.0\.1")
        for _ in range(2):  # a second connection over the same tunnel works too
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                assert b"hello from web:8080" in resp.read()
    finally:
        forward.stop()


def test_whoami_shows_the_caller(target: Target):
    proc = target.kubectl("auth", "whoami", "-o", "json", check=True)
    user = json.loads(proc.stdout)["status"]["userInfo"]
    assert user["username"] == target.expected_user
