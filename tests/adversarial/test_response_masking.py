"""Response masking tried with crafted requests (issue 13 §3): a valid developer token (alice) asks a masked
connection for Secret values in another representation (YAML, protobuf), through a pod's or a service's own
JSON with duplicate keys, and under keys named like identifiers. Each attempt is also made on the unmasked
connection (the control), which shows the value: so each check here can fail."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl
from workload_pods import apply, wait_for
from yarl import URL

from kubegate.sandbox.seed import DB_PASSWORD

ALICE = GATEWAY_USERS["alice"][1]
MARKER = "<masked by kubegate>"
MARKER_B64 = base64.b64encode(MARKER.encode()).decode()
NS = "dev"
ONE_BYTE = b"x"
BINARY = bytes(range(256)) * 4
BIG = (b"0123456789abcdef" * 65536)[: (1 << 20) - 4096]  # about 1 MiB: a Secret holds at most 1 MiB
SUFFIX = str(int(time.time()))
ODD = f"odd-values-{SUFFIX}"
IDENTIFIERS = f"identifier-keys-{SUFFIX}"
# A pod's own server answering JSON in which the known value comes first under a key repeated later.
DUPLICATES_SERVER = """
import http.server, os
BODY = ('{"kind":"Config","password":"%s","password":"fine","items":[{"v":"%s","v":"ok"}]}' % ((os.environ["LEAK"],) * 2)).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["SANDBOX_LISTEN_PORT_8000"])), Handler).serve_forever()
"""


# A pod's own server that puts the known value in response headers (and its body).
HEADERS_SERVER = """
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ('{"password":"%s"}' % os.environ["LEAK"]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream-Token", os.environ["LEAK"])
        self.send_header("Location", "https://db.example.invalid/?token=" + os.environ["LEAK"])
        self.send_header("Warning", '299 - "echo %s"' % os.environ["LEAK"])
        self.send_header("Set-Cookie", "session=%s; Path=/; HttpOnly" % os.environ["LEAK"])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["SANDBOX_LISTEN_PORT_8000"])), Handler).serve_forever()
"""
HOOKS = f"app-hooks-{SUFFIX}"
HOOK_URL = "https://hooks.example.invalid/services/T0k3nInTheUrlPath"
CONFIGMAP_KEYS = [{"namespaces": NS, "names": "app-hooks-*", "keys": ["*_URL"]}]


@pytest.fixture(scope="module")
def masked(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-response-masking")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    config["connections"]["masked"] = {"upstream": dict(plain["upstream"]),
                                       "plugins": {"static-tokens": plain["plugins"]["static-tokens"],
                                                   "masking": {"configmap_keys": CONFIGMAP_KEYS}}}  # fmt: skip
    # `kubectl create configmap --save-config` in a context whose namespace is dev, without -n: kubectl writes
    # the last-applied annotation without metadata.namespace (create_configmap.go: only with -n).
    in_dev = directory / "admin-in-dev"
    shutil.copy(sandbox.kubeconfig, in_dev)
    run_kubectl(in_dev, "config", "set-context", "--current", f"--namespace={NS}", check=True)
    run_kubectl(in_dev, "create", "configmap", HOOKS, f"--from-literal=SLACK_URL={HOOK_URL}",
                "--from-literal=MODE=fast", "--save-config", check=True)  # fmt: skip
    files = directory / "values"
    files.mkdir()
    for name, data in (("one", ONE_BYTE), ("bin", BINARY), ("big", BIG)):
        (files / name).write_bytes(data)
    run_kubectl(sandbox.kubeconfig, "create", "secret", "generic", ODD, "-n", NS, f"--from-file={files}",
                check=True)  # fmt: skip
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": IDENTIFIERS, "namespace": NS, "annotations": {"name": DB_PASSWORD, "uid": DB_PASSWORD}},
          "data": {"name": DB_PASSWORD, "uid": DB_PASSWORD, "namespace": DB_PASSWORD, "plain": "ok"}}  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dup-keys", "namespace": NS, "labels": {"app": "dup-keys"}},
           "spec": {"containers": [{"name": "server", "image": "python:3.11", "command": ["python3", "-c", DUPLICATES_SERVER],
                                    "env": [{"name": "LEAK", "value": DB_PASSWORD}],
                                    "ports": [{"name": "web", "containerPort": 8000}]}]}}  # fmt: skip
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dup-keys", "namespace": NS},
               "spec": {"selector": {"app": "dup-keys"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}  # fmt: skip
    headers_pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "hdr-leak", "namespace": NS, "labels": {"app": "hdr-leak"}},
                   "spec": {"containers": [{"name": "server", "image": "python:3.11",
                                            "command": ["python3", "-c", HEADERS_SERVER],
                                            "env": [{"name": "LEAK", "value": DB_PASSWORD}],
                                            "ports": [{"name": "web", "containerPort": 8000}]}]}}  # fmt: skip
    headers_service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hdr-leak", "namespace": NS},
                       "spec": {"selector": {"app": "hdr-leak"},
                                "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}  # fmt: skip
    apply(sandbox.kubeconfig, cm, pod, service, headers_pod, headers_service)
    gw = start_gateway(directory, config)
    # The known-values follower has listed the Secrets (DB_PASSWORD is one) and the pod's server is up.
    wait_for(lambda: b"fine" in get(gw, f"/api/v1/namespaces/{NS}/pods/dup-keys/proxy/", "sandbox")[2],
             what="the pod's server")  # fmt: skip
    wait_for(lambda: DB_PASSWORD.encode() not in get(gw, f"/api/v1/namespaces/{NS}/configmaps/{IDENTIFIERS}")[2],
             what="the known values")  # fmt: skip
    wait_for(lambda: b"password" in get(gw, f"/api/v1/namespaces/{NS}/pods/hdr-leak/proxy/", "sandbox")[2],
             what="the headers pod's server")  # fmt: skip
    yield gw
    stop_process(gw.process)


def get(
    gw: Gateway, path: str, connection: str = "masked", accept: str | None = None
) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET through the gateway as alice, with exactly this Accept."""
    import asyncio

    async def fetch() -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {ALICE}"}
        if accept is not None:
            headers["Accept"] = accept
        context = ssl.create_default_context(cafile=str(gw.ca_file))
        async with aiohttp.ClientSession(skip_auto_headers=("Accept",)) as session:
            url = URL(f"{gw.url}/k8s/{connection}{path}", encoded=True)
            async with session.get(url, headers=headers, ssl=context) as response:
                return response.status, response.headers.get("Content-Type", ""), await response.read()

    return asyncio.run(fetch())


def clear_forms(raw: bytes) -> list[bytes]:
    """How a value could show in a response: its base64 (a slice of it for a long one) and, when text, as is."""
    encoded = base64.b64encode(raw)
    forms = [encoded[:76]]
    if len(raw) > 3:
        forms.append(raw[:64])
    return forms


def test_yaml_of_a_secret_is_masked_whatever_the_values_size_or_bytes(masked):
    path = f"/api/v1/namespaces/{NS}/secrets/{ODD}"
    status, _, control = get(masked, path, "sandbox", accept="application/yaml")
    assert status == 200 and yaml.safe_load(control)["data"]["one"] == base64.b64encode(ONE_BYTE).decode()
    status, content_type, body = get(masked, path, accept="application/yaml")
    assert status == 200 and content_type.startswith("application/yaml")
    doc = yaml.safe_load(body)
    assert doc["data"] == {"one": MARKER_B64, "bin": MARKER_B64, "big": MARKER_B64}
    assert doc["metadata"]["name"] == ODD
    for raw in (ONE_BYTE, BINARY, BIG):
        for form in clear_forms(raw):
            assert form not in body


@pytest.mark.parametrize(
    "accept", ["application/yaml, application/json;q=0.5", "*/*;q=0.1, application/yaml"]
)
def test_yaml_preferred_among_others_is_masked_too(masked, accept):
    status, content_type, body = get(masked, f"/api/v1/namespaces/{NS}/secrets", accept=accept)
    assert status == 200 and content_type.startswith("application/yaml")
    odd = next(item for item in yaml.safe_load(body)["items"] if item["metadata"]["name"] == ODD)
    assert set(odd["data"].values()) == {MARKER_B64}
    assert base64.b64encode(ONE_BYTE) not in body


@pytest.mark.parametrize(
    ("accept", "watch"),
    [
        ("application/vnd.kubernetes.protobuf", False),
        ("application/vnd.kubernetes.protobuf;stream=watch", True),
        ("application/cbor", False),
        ("text/html", False),
        ("application/json;q=0, application/yaml;q=0, */*", False),
        ("application/yaml", True),
    ],
)
def test_what_cannot_be_masked_is_refused_406_before_reaching_upstream(masked, sandbox, accept, watch):
    path = f"/api/v1/namespaces/{NS}/secrets" + ("?watch=true&timeoutSeconds=1" if watch else f"/{ODD}")
    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    status, content_type, body = get(masked, path, accept=accept)
    assert status == 406 and content_type.startswith("application/json"), body[:300]
    refusal = json.loads(body)
    assert refusal["kind"] == "Status" and refusal["reason"] == "NotAcceptable"
    assert "application/json" in refusal["message"]
    assert not [
        r for r in sandbox.requests_log(since) if r["path"].startswith(f"/api/v1/namespaces/{NS}/secrets")
    ]


def test_upstream_is_asked_for_json_only(masked, sandbox):
    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    get(
        masked,
        f"/api/v1/namespaces/{NS}/secrets/{ODD}",
        accept="application/yaml, application/vnd.kubernetes.protobuf",
    )
    (record,) = [r for r in sandbox.requests_log(since) if r["path"].endswith(f"/secrets/{ODD}")]
    assert record["headers"]["accept"] == ["application/json"]


@pytest.mark.parametrize("route", ["pods/dup-keys/proxy/", "services/dup-keys:80/proxy/"])
def test_duplicate_keys_in_a_pods_own_json_do_not_carry_a_known_value(masked, route):
    path = f"/api/v1/namespaces/{NS}/{route}"
    _, _, control = get(masked, path, "sandbox")
    assert DB_PASSWORD.encode() in control  # what a first-wins parser reads from the original bytes
    status, content_type, body = get(masked, path)
    assert status == 200 and content_type.startswith("application/json")
    assert DB_PASSWORD.encode() not in body
    assert json.loads(body) == {
        "kind": "Config",
        "password": "fine",
        "items": [{"v": "ok"}],
    }  # no duplicates left


@pytest.mark.parametrize("accept", ["application/json", "application/yaml"])
def test_data_keyed_like_identifiers_is_masked(masked, accept):
    path = f"/api/v1/namespaces/{NS}/configmaps/{IDENTIFIERS}"
    _, _, control = get(masked, path, "sandbox", accept=accept)
    assert DB_PASSWORD.encode() in control
    status, _, body = get(masked, path, accept=accept)
    assert status == 200 and DB_PASSWORD.encode() not in body
    doc = yaml.safe_load(body)  # JSON is YAML too
    assert doc["data"] == {"name": MARKER, "uid": MARKER, "namespace": MARKER, "plain": "ok"}
    assert (
        doc["metadata"]["annotations"]["name"] == MARKER and doc["metadata"]["annotations"]["uid"] == MARKER
    )
    assert doc["metadata"]["name"] == IDENTIFIERS and doc["metadata"]["namespace"] == NS


def kubeconfig(gw: Gateway) -> Path:
    return gw.kubeconfig("alice", "masked")


def test_kubectl_still_works_through_the_masked_connection(masked):
    cm = run_kubectl(kubeconfig(masked), "get", "cm", IDENTIFIERS, "-n", NS, "-o", "yaml", check=True).stdout
    assert yaml.safe_load(cm)["data"]["name"] == MARKER and DB_PASSWORD not in cm
    pods = run_kubectl(kubeconfig(masked), "get", "pods", "-n", "prod", check=True).stdout
    assert "web" in pods and "NAME" in pods
    logs = run_kubectl(kubeconfig(masked), "logs", "web", "-n", "prod", "-c", "app", "--tail=2", check=True)
    assert logs.stdout and DB_PASSWORD not in logs.stdout
    described = run_kubectl(kubeconfig(masked), "describe", "pod", "web", "-n", "prod", check=True).stdout
    assert "app:" in described and "DB_PASSWORD" in described and DB_PASSWORD not in described
    secret = run_kubectl(kubeconfig(masked), "describe", "secret", ODD, "-n", NS, check=True).stdout
    assert "big:" in secret
    watch = run_kubectl(kubeconfig(masked), "get", "secrets", "-n", NS, "-w", "--request-timeout=2s")
    assert ODD in watch.stdout


# -- beside the object: the last-applied annotation, response headers (red team masking2) ---------------------


@pytest.mark.parametrize(
    "path",
    [f"/api/v1/namespaces/{NS}/configmaps/{HOOKS}", f"/api/v1/namespaces/{NS}/configmaps",
     f"/api/v1/namespaces/{NS}/configmaps?watch=true&timeoutSeconds=1"],
)  # fmt: skip
def test_configmap_keys_in_a_last_applied_annotation_without_a_namespace_are_masked(masked, path):
    _, _, control = get(masked, path, "sandbox")
    assert HOOK_URL.encode() in control  # the annotation kubectl wrote carries the value
    status, _, body = get(masked, path)
    assert status == 200 and HOOK_URL.encode() not in body, body[:400]
    docs = [json.loads(line) for line in body.splitlines() if line.strip()]
    objects = [d.get("object", d) for d in docs]
    objects = [i for o in objects for i in (o.get("items") or [o])]
    (cm,) = [o for o in objects if o["metadata"]["name"] == HOOKS]
    applied = json.loads(cm["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert applied["data"] == {"SLACK_URL": MARKER, "MODE": "fast"} and "namespace" not in applied["metadata"]


@pytest.mark.parametrize("route", ["pods/hdr-leak/proxy/", "services/hdr-leak:80/proxy/"])
def test_response_headers_of_a_pods_own_server_do_not_carry_a_known_value(masked, route):
    path = f"/api/v1/namespaces/{NS}/{route}"
    _, control, _ = get_with_headers(masked, path, "sandbox")
    assert DB_PASSWORD in control["x-upstream-token"]  # the pod really sent it
    status, headers, body = get_with_headers(masked, path)
    assert status == 200 and DB_PASSWORD.encode() not in body
    clear = {name: value for name, value in headers.items() if DB_PASSWORD in value}
    assert not clear, f"response headers carry the known value in clear: {clear}"
    assert headers["x-upstream-token"] == MARKER
    assert headers["location"] == f"https://db.example.invalid/?token={MARKER}"
    assert headers["set-cookie"].startswith("session=") and headers["set-cookie"].endswith(
        "; Path=/; HttpOnly"
    )


def get_with_headers(gw: Gateway, path: str, connection: str = "masked") -> tuple[int, dict[str, str], bytes]:
    """(status, response headers by lower-case name, body) of a GET through the gateway as alice, redirects not
    followed."""
    import asyncio

    async def fetch() -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context(cafile=str(gw.ca_file))
        async with aiohttp.ClientSession() as session:
            url = URL(f"{gw.url}/k8s/{connection}{path}", encoded=True)
            async with session.get(url, headers={"Authorization": f"Bearer {ALICE}"}, ssl=context,
                                   allow_redirects=False) as response:  # fmt: skip
                headers = {name.lower(): value for name, value in response.headers.items()}
                return response.status, headers, await response.read()

    return asyncio.run(fetch())
