"""Masking end to end: real kubectl and the Python client read the sandbox's secrets through a masked
connection; after each, the clear value is nowhere — not in the client's bytes, not in the audit records."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import Background, run_kubectl, wait_for

from kubegate.sandbox.seed import API_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, DB_PASSWORD

MARKER = "<masked by kubegate>"
CLEAR = [DB_PASSWORD, base64.b64encode(DB_PASSWORD.encode()).decode(), API_TOKEN, AWS_SECRET_ACCESS_KEY]
EVE = ("eve-token-0123456789abcdef", ["breakglass"])


@pytest.fixture(scope="module")
def masked(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-masking")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    plain["plugins"]["static-tokens"]["tokens"].append(
        {"user": "eve", "groups": EVE[1], "sha256": hashlib.sha256(EVE[0].encode()).hexdigest()}
    )
    config["connections"]["masked"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {
            "static-tokens": plain["plugins"]["static-tokens"],
            "masking": {"exempt": {"groups": ["breakglass"]}, "exec_hold_ms": 1000,
                        "configmap_keys": [{"namespaces": "prod", "names": "app-config", "keys": ["DB_HOST"]}]},
            "testplugin": {"audit_file": str(directory / "audit.jsonl")},
            # the real stores: what they keep must be masked too
            "audit-db": {},
            "audit-file": {},
            "recording": {},
        },
    }  # fmt: skip
    config["plugins"] = {"audit-file": {"path": str(directory / "audit-sink.jsonl")}}
    gw = start_gateway(directory, config, with_test_plugin=True)
    time.sleep(1)  # the known-values follower lists the Secrets at start
    yield gw
    stop_process(gw.process)


def kc(gw: Gateway, *args: str, user: str = "alice", token: str | None = None, check: bool = True):
    return run_kubectl(gw.kubeconfig(user, "masked", token=token), *args, check=check)


def stored(gw: Gateway) -> str:
    """Everything the gateway keeps: audit events (test plugin, audit-file, the database incl. its WAL) and
    session recordings, as text."""
    time.sleep(1.0)  # events are written once the response is out; recordings are flushed every 0.5 s
    state = gw.dir / "state"
    paths = [gw.dir / "audit.jsonl", gw.dir / "audit-sink.jsonl", *state.glob("kubegate.db*"),
             *(state / "recordings").glob("*.cast")]  # fmt: skip
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in paths if p.exists())


def assert_clean(gw: Gateway, *outputs: str) -> None:
    kept = stored(gw)
    assert "db-credentials" in kept or "web" in kept  # the stores are there and hold these requests
    for text in (*outputs, kept):
        for value in CLEAR:
            assert value not in text


def test_unmasked_connection_shows_the_value(masked):
    """The control: without the plugin the same command prints the secret (so the checks below can fail)."""
    out = run_kubectl(masked.kubeconfig("alice", "sandbox"), "get", "secret", "db-credentials", "-n", "prod",
                      "-o", "jsonpath={.data.password}", check=True).stdout  # fmt: skip
    assert base64.b64decode(out).decode() == DB_PASSWORD


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_get_secret_shows_valid_base64_of_the_marker(masked, output):
    proc = kc(masked, "get", "secret", "db-credentials", "-n", "prod", "-o", output)
    doc = yaml.safe_load(proc.stdout)
    assert {base64.b64decode(v).decode() for v in doc["data"].values()} == {MARKER}
    assert doc["metadata"]["name"] == "db-credentials" and doc["metadata"]["resourceVersion"]
    assert_clean(masked, proc.stdout, proc.stderr)


def test_describe_and_table_keep_working(masked):
    described = kc(masked, "describe", "secret", "db-credentials", "-n", "prod")  # asks for protobuf first
    assert "password:" in described.stdout and "Opaque" in described.stdout
    table = kc(masked, "get", "secrets", "-n", "prod")
    assert "db-credentials" in table.stdout and "Opaque" in table.stdout
    assert_clean(masked, described.stdout, table.stdout)


def test_deployment_env_and_configmap_rule(masked):
    deploy = kc(masked, "get", "deploy", "web", "-n", "prod", "-o", "yaml")
    env = yaml.safe_load(deploy.stdout)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "API_KEY", "value": MARKER} in env
    assert AWS_ACCESS_KEY_ID not in deploy.stdout
    cm = yaml.safe_load(kc(masked, "get", "configmap", "app-config", "-n", "prod", "-o", "yaml").stdout)
    assert cm["data"]["DB_HOST"] == MARKER and cm["data"]["LOG_LEVEL"] == "info"


@pytest.mark.needs_pods
def test_logs_are_masked_by_value_and_pattern(masked):
    proc = kc(masked, "logs", "web", "-n", "prod", "--tail=3")
    assert f"db=postgres://app:{MARKER}@db:5432/app" in proc.stdout
    assert f"AWS_SECRET_ACCESS_KEY={MARKER}" in proc.stdout
    assert_clean(masked, proc.stdout)


@pytest.mark.needs_pods
def test_logs_follow_is_masked_as_it_streams(masked):
    follow = subprocess.Popen(
        [str(VENV_BIN / "kubectl"), "logs", "-f", "web", "-n", "prod", "--tail=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"KUBECONFIG": str(masked.kubeconfig("alice", "masked")), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    lines = [follow.stdout.readline() for _ in range(3)]
    follow.kill()
    follow.wait(10)
    assert all(MARKER in line for line in lines), lines
    assert_clean(masked, *lines)


@pytest.mark.needs_pods
def test_exec_output_is_masked_even_for_a_plain_value(masked):
    env = kc(masked, "exec", "web", "-n", "prod", "--", "env")
    assert f"DB_PASSWORD={MARKER}" in env.stdout
    echo = kc(masked, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo $DB_PASSWORD")
    assert echo.stdout.strip() == MARKER  # no pattern knows `hunter2…`: the gateway knows the value
    assert_clean(masked, env.stdout, echo.stdout)


def test_watch_masks_a_secret_as_it_changes(masked, sandbox):
    name = f"rotating-{int(time.time())}"
    run_kubectl(sandbox.kubeconfig, "create", "secret", "generic", name, "-n", "dev", "--from-literal=pw=first-value-1",
                check=True)  # fmt: skip
    watch = Background(["kubectl", "get", "secret", name, "-n", "dev", "-w", "-o", "json"],
                       masked.kubeconfig("alice", "masked"))  # fmt: skip
    value = r'(?s).*?"pw":\s*"[^"]*"'  # everything up to and including the next value of pw
    try:
        out = watch.read_until(value).group(0).decode()  # the initial object: the watch is open
        new = "rotated-value-2"
        patch = json.dumps({"data": {"pw": base64.b64encode(new.encode()).decode()}})
        run_kubectl(sandbox.kubeconfig, "patch", "secret", name, "-n", "dev", "-p", patch, check=True)
        out += watch.read_until(value).group(0).decode()  # the change
    finally:
        watch.stop()
    assert out.count('"pw"') == 2  # the initial object and the change
    assert base64.b64encode(MARKER.encode()).decode() in out
    for value in ("first-value-1", new, base64.b64encode(new.encode()).decode()):
        assert value not in out


def test_applied_string_data_is_masked_in_the_last_applied_annotation(masked, sandbox, tmp_path):
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "applied",
                                        "namespace": "dev"}, "stringData": {"token": "applied-s3cret-value"}}))  # fmt: skip
    run_kubectl(sandbox.kubeconfig, "apply", "-f", str(manifest), check=True)
    proc = kc(masked, "get", "secret", "applied", "-n", "dev", "-o", "yaml")
    doc = yaml.safe_load(proc.stdout)
    applied = json.loads(doc["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert applied["stringData"] == {"token": MARKER}
    assert "applied-s3cret-value" not in proc.stdout


def test_python_client_reads_masked_objects(masked):
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(str(masked.kubeconfig("alice", "masked"))))
    secret = api.read_namespaced_secret("db-credentials", "prod")
    assert {base64.b64decode(v).decode() for v in secret.data.values()} == {MARKER}
    listed = api.list_namespaced_secret("prod")
    assert all(base64.b64decode(v).decode() == MARKER for s in listed.items for v in (s.data or {}).values())


def test_exempt_group_sees_clear_values_and_it_is_audited(masked):
    proc = kc(masked, "get", "secret", "db-credentials", "-n", "prod", "-o", "jsonpath={.data.password}",
              user="eve", token=EVE[0])  # fmt: skip
    assert base64.b64decode(proc.stdout).decode() == DB_PASSWORD

    # The request's audit event is written once the response is sent: wait for it.
    def eve_exempt_audited() -> bool:
        events = [json.loads(line) for line in (masked.dir / "audit.jsonl").read_text().splitlines()]
        return any((e.get("identity") or {}).get("user") == "eve" and (e.get("masking") or {}).get("exempt")
                   for e in events)  # fmt: skip

    wait_for(eve_exempt_audited, "eve's exempt read in the audit file", ignore=(ValueError,))


def test_masked_connection_asks_upstream_for_json_only(masked, sandbox):
    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    kc(masked, "describe", "secret", "db-credentials", "-n", "prod")
    records = [r for r in sandbox.requests_log(since) if r["path"].endswith("/secrets/db-credentials")]
    assert records
    for record in records:
        (accept,) = record["headers"]["accept"]
        assert "protobuf" not in accept and "application/json" in accept, accept
        assert record["headers"]["accept-encoding"] == ["identity"]


def test_create_secret_from_literal_answer_is_masked(masked):
    # kubectl sends this body as protobuf; the answer comes back as JSON and is masked.
    name = f"created-{int(time.time())}"
    proc = kc(masked, "create", "secret", "generic", name, "-n", "dev", "--from-literal=pw=created-s3cret-9",
              "-o", "yaml")  # fmt: skip
    assert base64.b64decode(yaml.safe_load(proc.stdout)["data"]["pw"]).decode() == MARKER
    kept = stored(masked)
    for text in (proc.stdout, kept):  # the answer, and the request body in the audit stores
        assert "created-s3cret-9" not in text
        assert base64.b64encode(b"created-s3cret-9").decode() not in text
    assert name in kept


@pytest.mark.needs_pods
def test_interactive_exec_output_is_masked(masked):
    from kubetest import PtySession

    session = PtySession(
        ["kubectl", "exec", "-it", "web", "-n", "prod", "--", "sh"], masked.kubeconfig("alice", "masked")
    )
    try:
        session.send("echo token=$DB_PASSWORD\n")
        printed = session.expect(r"token=([^$\r\n][^\r\n]*)\r?\n", timeout=30)  # the output, not the echo
        assert printed.group(1).decode() == MARKER
        session.send("exit\n")
        session.wait()
    finally:
        session.close()
    kept = stored(masked)
    assert "echo token=" in kept  # the session was recorded (typed input and output)...
    assert_clean(masked)  # ...masked


@pytest.mark.needs_pods
def test_a_secret_split_across_exec_frames_is_still_masked(masked):
    # Two writes 50 ms apart arrive as two frames; the first ends inside the secret.
    script = "printf 'db password is hunter2-pr'; sleep 0.05; printf 'od-s3cret ok'; sleep 0.05; echo"
    proc = kc(masked, "exec", "web", "-n", "prod", "--", "sh", "-c", script)
    assert proc.stdout.strip() == f"db password is {MARKER} ok"
    assert_clean(masked, proc.stdout)


def test_apply_works_through_a_masked_connection(masked, tmp_path):
    # kubectl apply validates against /openapi (asked for as protobuf, served as JSON here) and reads the
    # object back: both go through the masking plugin.
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": f"applied-{int(time.time())}", "namespace": "dev"},
                                        "data": {"LEVEL": "info"}}))  # fmt: skip
    proc = kc(masked, "apply", "-f", str(manifest))
    assert "configured" in proc.stdout or "created" in proc.stdout
