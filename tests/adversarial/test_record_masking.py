"""Records never keep a secret in clear, whatever shape it is sent in: real kubectl writes Secrets with every
patch type, server-side apply and a protobuf create, and runs exec command lines with passwords in them,
through a gateway that keeps everything (audit-db, audit-file, a test audit sink, approvals, recordings).
After each, the clear value (and its base64) is nowhere in the stores' files (the database with its WAL,
the audit files, the session casts) nor in what reviewers are shown — while the sandbox cluster did get
the request (the value was really sent)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import gateway_api, run_kubectl

KUBECTL = str(VENV_BIN / "kubectl")
MARKER = "<masked by kubegate>"
RITA = ("rita", ["reviewers"], "rita-token-0123456789abcdef")
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "default-secret-writes", "match": {"verbs": ["patch", "update"], "resources": ["secrets"],
                                                     "namespaces": ["default"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
        {"name": "held-exec", "match": {"resources": ["pods/exec"], "commands": ["*held*"]},
         "action": "approve", "approval": {"reviewer_groups": ["reviewers"]}},
    ],
}  # fmt: skip


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-record-masking")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    plain["plugins"]["static-tokens"]["tokens"].append(
        {"user": RITA[0], "groups": RITA[1], "sha256": hashlib.sha256(RITA[2].encode()).hexdigest()}
    )
    stores = {"audit-db": {}, "audit-file": {}, "recording": {}, "approvals": {}, "policy": POLICY,
              "testplugin": {"audit_file": str(directory / "audit.jsonl")}}  # fmt: skip
    config["connections"]["masked"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {
            "static-tokens": plain["plugins"]["static-tokens"],
            "masking": {"configmap_keys": [{"namespaces": "dev", "names": "app-rec-*", "keys": ["*_URL"]}]},
            **stores,
        },
    }
    # Without masking on the connection, records are masked with the default rules all the same.
    config["connections"]["unmasked"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {"static-tokens": plain["plugins"]["static-tokens"], **stores},
    }
    config["plugins"] = {"audit-file": {"path": str(directory / "audit-sink.jsonl")}}
    gateway = start_gateway(directory, config, with_test_plugin=True)
    yield gateway
    stop_process(gateway.process)


def kc(gw: Gateway, *args: str, connection: str = "masked") -> subprocess.CompletedProcess:
    return run_kubectl(gw.kubeconfig("alice", connection), *args, check=True)


def stored(gw: Gateway) -> str:
    """Everything the gateway keeps, as text: audit events (test sink, audit-file, the database and its
    WAL, which also hold approval requests and session rows) and session recordings."""
    time.sleep(1.0)  # events are written once the response is out; recordings are flushed every 0.5 s
    state = gw.dir / "state"
    paths = [gw.dir / "audit.jsonl", gw.dir / "audit-sink.jsonl", *state.glob("kubegate.db*"),
             *(state / "recordings").rglob("*.cast")]  # fmt: skip
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in paths if p.exists())


def assert_absent(text: str, *values: str) -> None:
    for value in values:
        for form in (value, b64(value)):
            assert form not in text, f"{form!r} is in a record"


def upstream_saw(sandbox, path_part: str, needle: str) -> bool:
    """Whether the sandbox cluster received a request to `path_part` carrying `needle` (body or query)."""
    return any(path_part in r.get("path", "") and needle in json.dumps(r) for r in sandbox.requests_log())


def secret_value(gw: Gateway, namespace: str, name: str, key: str) -> str:
    """The value the cluster holds, read through the connection without masking."""
    proc = run_kubectl(gw.kubeconfig("alice", "sandbox"), "get", "secret", name, "-n", namespace, "-o", "json",
                       check=True)  # fmt: skip
    return base64.b64decode((json.loads(proc.stdout).get("data") or {}).get(key, "")).decode()


# -- bodies ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connection", ["masked", "unmasked"])
def test_every_patch_type_and_server_side_apply_of_a_secret_stays_masked(gw, sandbox, tmp_path, connection):
    name = f"rec-{connection}-{int(time.time() * 1000) % 10**8}"
    clear = {kind: f"Clear-{kind}-{connection}-7qz" for kind in ("create", "json", "merge", "smp", "apply")}
    kc(gw, "create", "secret", "generic", name, "-n", "dev", f"--from-literal=pw={clear['create']}",
       connection=connection)  # fmt: skip
    kc(gw, "patch", "secret", name, "-n", "dev", "--type=json",
       "-p", json.dumps([{"op": "add", "path": "/data/j", "value": b64(clear["json"])}]), connection=connection)  # fmt: skip
    kc(gw, "patch", "secret", name, "-n", "dev", "--type=merge",
       "-p", json.dumps({"stringData": {"m": clear["merge"]}}), connection=connection)  # fmt: skip
    kc(gw, "patch", "secret", name, "-n", "dev", "--type=strategic",
       "-p", json.dumps({"data": {"s": b64(clear["smp"])}}), connection=connection)  # fmt: skip
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                                        "metadata": {"name": name, "namespace": "dev"},
                                        "stringData": {"a": clear["apply"]}}))  # fmt: skip
    kc(gw, "apply", "--server-side", "--force-conflicts", "-f", str(manifest), connection=connection)
    # The cluster got every value: the requests went through as sent.
    for key, kind in (("pw", "create"), ("j", "json"), ("m", "merge"), ("s", "smp"), ("a", "apply")):
        assert secret_value(gw, "dev", name, key) == clear[kind], kind
    kept = stored(gw)
    assert name in kept  # the stores hold these requests
    # The JSON patch is shown, its value masked.
    assert f'[{{\\"op\\":\\"add\\",\\"path\\":\\"/data/j\\",\\"value\\":\\"{MARKER}\\"}}]' in kept
    assert_absent(kept, *clear.values())


def test_configmap_keys_are_masked_where_the_request_not_the_body_names_the_configmap(gw, tmp_path):
    """alice's kubeconfig context has namespace dev and kubectl runs without -n: the create's body names no
    namespace, a patch's names nothing; the masked connection's `configmap_keys` rule for dev applies."""
    in_dev = tmp_path / "alice-in-dev"
    shutil.copy(gw.kubeconfig("alice", "masked"), in_dev)
    run_kubectl(in_dev, "config", "set-context", "--current", "--namespace=dev", check=True)
    name = f"app-rec-{int(time.time() * 1000) % 10**8}"
    clear = {kind: f"https://hooks.example.invalid/{kind}-Clear-9wq" for kind in ("create", "smp", "merge")}
    run_kubectl(in_dev, "create", "configmap", name, f"--from-literal=SLACK_URL={clear['create']}",
                "--save-config", check=True)  # fmt: skip
    run_kubectl(in_dev, "patch", "configmap", name, "-p", json.dumps({"data": {"HOOK_URL": clear["smp"]}}),
                check=True)  # fmt: skip
    run_kubectl(in_dev, "patch", "configmap", name, "--type=merge",
                "-p", json.dumps({"data": {"MERGE_URL": clear["merge"]}}), check=True)  # fmt: skip
    # The cluster got every value: the requests went through as sent.
    proc = run_kubectl(gw.kubeconfig("alice", "sandbox"), "get", "configmap", name, "-n", "dev", "-o", "json",
                       check=True)  # fmt: skip
    assert set(json.loads(proc.stdout)["data"].values()) == set(clear.values())
    kept = stored(gw)
    assert name in kept  # the stores hold these requests
    assert_absent(kept, *clear.values())


def test_a_held_json_patch_shows_reviewers_where_it_goes_not_what(gw):
    name = f"held-{int(time.time() * 1000) % 10**8}"
    kc(gw, "create", "secret", "generic", name, "-n", "default", "--from-literal=pw=x")
    clear = "Clear-held-json-patch-5kd"
    # (A `test` of a value would be an oracle: the masking plugin refuses it outright, see
    # test_secret_value_oracles.py; this patch only writes.)
    patch = [{"op": "replace", "path": "/data/pw", "value": b64(clear)},
             {"op": "add", "path": "/data/pw2", "value": b64(clear)}]  # fmt: skip
    held = subprocess.Popen(
        [KUBECTL, "patch", "secret", name, "-n", "default", "--type=json", "-p", json.dumps(patch)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig("alice", "masked")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        item = wait_pending(gw, resource="secrets", name=name)
        preview = json.loads(item["body_preview"])
        assert [op["path"] for op in preview] == ["/data/pw", "/data/pw2"]
        assert all(op["value"] == MARKER for op in preview)
        assert_absent(json.dumps(item) + json.dumps(review(gw, "GET", f"/api/approvals/{item['id']}")), clear)
        review(gw, "POST", f"/api/approvals/{item['id']}/deny", {"comment": "no"})
    finally:
        held.communicate(timeout=30)
    assert_absent(stored(gw), clear)


# -- command lines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connection", ["masked", "unmasked"])
def test_exec_command_lines_are_masked_in_audit_sessions_and_casts(gw, sandbox, connection):
    mysql = f"Clear-mysql-{connection}-3hv"
    env = f"Clear-env-{connection}-8pw"
    kc(gw, "exec", "web", "-n", "prod", "--", "sh", "-c", f"mysql -uroot -p{mysql} shop 2>/dev/null || true",
       connection=connection)  # fmt: skip
    kc(gw, "exec", "web", "-n", "prod", "--", "env", f"DB_PASSWORD={env}", "true", connection=connection)
    assert upstream_saw(sandbox, "/pods/web/exec", mysql) and upstream_saw(sandbox, "/pods/web/exec", env)
    kept = stored(gw)
    assert "mysql -uroot -p" in kept and "DB_PASSWORD=" in kept  # the command lines are recorded…
    assert f"-p{MARKER}" in kept.replace("%3C", "<").replace("%3E", ">").replace("%20", " ")
    assert_absent(kept, mysql, env)  # …masked: audit query, session rows, cast titles
    casts = [p.read_text() for p in (gw.dir / "state" / "recordings").rglob("*.cast")]
    titles = [json.loads(cast.splitlines()[0]).get("title", "") for cast in casts if cast]
    assert any(
        title.endswith(f"$ sh -c mysql -uroot -p{MARKER} shop 2>/dev/null || true") for title in titles
    )


def test_a_held_exec_shows_reviewers_the_masked_command(gw):
    clear = "Clear-held-exec-2mn"
    held = subprocess.Popen(
        [KUBECTL, "exec", "web", "-n", "prod", "--", "sh", "-c", f"echo held; mysql -p{clear}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig("alice", "masked")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        item = wait_pending(gw, resource="pods/exec")
        assert item["command"] == ["sh", "-c", f"echo held; mysql -p{MARKER}"]
        assert_absent(json.dumps(item) + json.dumps(review(gw, "GET", f"/api/approvals/{item['id']}")), clear)
        listing = subprocess.run([str(VENV_BIN / "kubegate"), "approvals", "show", item["id"], "-c", str(gw.config)],
                                 capture_output=True, text=True)  # fmt: skip
        assert_absent(listing.stdout + listing.stderr, clear)
        review(gw, "POST", f"/api/approvals/{item['id']}/deny", {"comment": "no"})
    finally:
        held.communicate(timeout=30)
    assert_absent(stored(gw), clear)


# -- helpers --------------------------------------------------------------------------------------------------


def review(gw: Gateway, method: str, path: str, body: dict | None = None) -> Any:
    return gateway_api(gw, method, path, RITA[2], body)[1]


def wait_pending(gw: Gateway, **expect: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for item in review(gw, "GET", "/api/approvals")["items"]:
            if item.get("state", "pending") == "pending" and all(item.get(k) == v for k, v in expect.items()):
                return item
        time.sleep(0.2)
    raise AssertionError(f"no pending request like {expect}")


def test_a_lone_surrogate_in_a_review_comment_stops_no_record(gw):
    """A JSON `\\ud800` escape parses to a string UTF-8 cannot carry. A reviewer's comment holding one went
    into the `approval.denied` audit event, which audit-db and audit-file then failed to write on every
    retry: nothing after it was recorded (with `on_failure: closed`, every request refused). Now the record
    is written with U+FFFD in its place, and the requests after it are recorded."""
    held = subprocess.Popen(
        [KUBECTL, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo held surrogate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(gw.kubeconfig("alice", "masked")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        item = wait_pending(gw, resource="pods/exec")
        status, answer = gateway_api(gw, "POST", f"/api/approvals/{item['id']}/deny", RITA[2],
                                     {"comment": "no \ud800 way"})  # fmt: skip
        assert status == 200 and answer["state"] == "denied", answer
    finally:
        _, err = held.communicate(timeout=30)
    assert "denied by rita: no \ufffd way" in err
    marker = f"after-surrogate-{int(time.time() * 1000) % 10**8}"
    run_kubectl(gw.kubeconfig("alice", "masked"), "get", "configmap", marker, "-n", "default", check=False)
    time.sleep(1.0)  # events are written once the response is out
    audit_file = (gw.dir / "audit-sink.jsonl").read_text()  # the audit-file sink (chained lines)
    with sqlite3.connect(gw.dir / "state" / "kubegate.db") as db:
        rows = "\n".join(r[0] for r in db.execute("SELECT record FROM kubegate_audit_events"))
    for kept in (audit_file, rows):
        assert "no \ufffd way" in kept and marker in kept
