"""Known-value masking fails closed: a gateway whose own credential may not list and watch Secrets (the
sandbox's `view` group, like Kubernetes' built-in `view` role) cannot learn the values it must mask in logs
and exec output. With `known_values.on_failure: closed` (the default) real kubectl gets a 503 that says
why and what to do, discovery still works, and /readyz names the connection; with `open` requests go on."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml
from conftest import Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl

from kubegate.core.tls import CertFiles, write_client_certificate
from kubegate.sandbox.seed import DB_PASSWORD

MARKER = "<masked by kubegate>"


@pytest.fixture(scope="module")
def blind(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-known-rbac")
    tls = sandbox.dir / "tls"
    files = CertFiles(
        ca_cert=tls / "ca.crt", ca_key=tls / "ca.key", cert=tls / "server.crt", key=tls / "server.key"
    )
    # The gateway's user (it may impersonate) in group `view`: everything but Secrets.
    cert, key = write_client_certificate(files, directory, "gateway-view", "kubegate-gateway", ["view"])
    config = gateway_config(sandbox, directory, free_port())
    tokens = config["connections"]["sandbox"]["plugins"]["static-tokens"]
    upstream = {"server": sandbox.url, "certificate_authority": str(sandbox.ca_file),
                "client_certificate": str(cert), "client_key": str(key)}  # fmt: skip
    config["connections"]["blind"] = {"upstream": upstream,
                                      "plugins": {"static-tokens": tokens, "masking": {}}}  # fmt: skip
    config["connections"]["blind-open"] = {
        "upstream": upstream,
        "plugins": {"static-tokens": tokens, "masking": {"known_values": {"on_failure": "open"}}},
    }
    # The same gateway with the sandbox's admin token: may follow the Secrets.
    config["connections"]["seeing"] = {"upstream": dict(config["connections"]["sandbox"]["upstream"]),
                                       "plugins": {"static-tokens": tokens, "masking": {}}}  # fmt: skip
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def test_kubectl_is_refused_with_the_reason(blind):
    proc = run_kubectl(blind.kubeconfig("alice", "blind"), "get", "pods", "-n", "prod", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error from server (ServiceUnavailable): masking on connection blind cannot "
                                  "mask the cluster's Secret values: cannot list and watch the Secrets of the "
                                  "cluster with the gateway's credential (listing Secrets answered 403: "
                                  'secrets is forbidden: User "kubegate-gateway" cannot list resource "secrets" '
                                  'in API group "" at the cluster scope)')  # fmt: skip
    assert proc.stderr.rstrip().endswith(
        "requests are refused until it can (masking.known_values.on_failure: closed)"
    )
    assert DB_PASSWORD not in proc.stdout + proc.stderr


def test_exec_is_refused_before_the_session(blind):
    proc = run_kubectl(blind.kubeconfig("alice", "blind"), "exec", "web", "-n", "prod", "--", "sh", "-c",
                       "echo $DB_PASSWORD", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "Error from server (ServiceUnavailable): masking on connection blind cannot"
    )
    assert DB_PASSWORD not in proc.stdout + proc.stderr


def test_discovery_still_answers(blind):
    proc = run_kubectl(blind.kubeconfig("alice", "blind"), "version", "-o", "json", check=True)
    assert json.loads(proc.stdout)["serverVersion"]["gitVersion"]


def test_readyz_names_the_connection_and_why(blind):
    status, body = blind.get("/readyz")
    report = json.loads(body)
    # Another connection (the suite's `sandbox`) serves: the replica stays in the load balancer.
    assert status == 200 and report["ready"]
    assert report["connections"]["sandbox"] == "ok"
    assert report["connections"]["blind"].startswith(
        "masking: cannot list and watch the Secrets of the cluster with the gateway's credential"
    )
    assert report["connections"]["blind-open"] == "ok"
    assert report["connections"]["seeing"] == "ok"


def test_metrics_show_the_follower_down(blind):
    text = blind.get("/metrics")[1]
    assert 'kubegate_masking_known_values_up{connection="blind"} 0.0' in text
    assert 'kubegate_masking_known_values_up{connection="blind-open"} 0.0' in text
    assert 'kubegate_masking_known_values_up{connection="seeing"} 1.0' in text


def test_a_connection_that_follows_the_secrets_serves(blind, sandbox):
    proc = run_kubectl(blind.kubeconfig("alice", "seeing"), "get", "secret", "db-credentials", "-n", "prod",
                       "-o", "jsonpath={.metadata.name}", check=True)  # fmt: skip
    assert proc.stdout == "db-credentials"
    # As client-go's reflector: the list in pages of 500, then a watch from the list's version.
    followed = [r for r in sandbox.requests_log() if r["path"] == "/api/v1/secrets"]
    assert any("limit=500" in r["query"] and "watch" not in r["query"] for r in followed)
    assert any("watch=1" in r["query"] and "resourceVersion=" in r["query"] for r in followed)


def test_on_failure_open_lets_requests_through_masked_by_structure(blind):
    kubeconfig = blind.kubeconfig("alice", "blind-open")
    run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True)
    doc = yaml.safe_load(run_kubectl(kubeconfig, "get", "secret", "db-credentials", "-n", "prod", "-o", "yaml",
                                     check=True).stdout)  # fmt: skip
    assert doc["data"] and {base64.b64decode(v).decode() for v in doc["data"].values()} == {MARKER}


def test_a_secret_larger_than_a_read_buffer_keeps_the_follower_watching(blind, sandbox, tmp_path):
    # An 800 KB Secret's watch event is one line longer than aiohttp's line limit (512 KiB); the follower must
    # read on (no re-list: the watch that carried it is still open) and learn the next Secret from it.
    plain, seeing = blind.kubeconfig("alice", "sandbox"), blind.kubeconfig("alice", "seeing")
    run_kubectl(seeing, "get", "pods", "-n", "dev", check=True)  # the follower has listed
    since = max((r["id"] for r in sandbox.requests_log()), default=0)
    name, value = f"large-{uuid.uuid4().hex[:8]}", f"after-large-{secrets.token_hex(8)}"
    (tmp_path / "v").write_text(secrets.token_hex(300_000))
    try:
        run_kubectl(plain, "create", "secret", "generic", name, "-n", "dev", f"--from-file=v={tmp_path / 'v'}",
                    check=True)  # fmt: skip
        run_kubectl(plain, "create", "secret", "generic", f"{name}-next", "-n", "dev", f"--from-literal=v={value}",
                    check=True)  # fmt: skip
        run_kubectl(
            plain, "create", "configmap", name, "-n", "dev", f"--from-literal=note=is {value}", check=True
        )
        deadline = time.monotonic() + 10
        while True:
            got = run_kubectl(
                seeing, "get", "configmap", name, "-n", "dev", "-o", "jsonpath={.data.note}", check=True
            )
            if got.stdout == f"is {MARKER}" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got.stdout == f"is {MARKER}"
        lists = [r for r in sandbox.requests_log(since) if r["path"] == "/api/v1/secrets"
                 and "watch" not in r["query"]]  # fmt: skip
        assert lists == [], "the follower listed the Secrets again: its watch broke"
    finally:
        for kind, what in (("secret", name), ("secret", f"{name}-next"), ("configmap", name)):
            run_kubectl(plain, "delete", kind, what, "-n", "dev", check=False)
