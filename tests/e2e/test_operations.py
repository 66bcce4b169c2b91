"""Operating the gateway: /healthz, /readyz (database and upstreams), Prometheus /metrics showing a kubectl
session's traffic, JSON logs with the request id, graceful shutdown, config reload on SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import VENV_BIN, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl, wait_for


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return None


@pytest.fixture(scope="module")
def observed(sandbox, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw-ops")
    config = gateway_config(sandbox, directory, free_port())
    config["log_format"] = "json"
    config["connections"]["sandbox"]["plugins"]["audit-db"] = {}
    config["connections"]["down"] = {
        "upstream": {"server": f"https://127.0.0.1:{free_port()}", "insecure_skip_tls_verify": True,
                     "token_file": str(directory / "upstream-token")},
        "plugins": {"static-tokens": config["connections"]["sandbox"]["plugins"]["static-tokens"], "audit-db": {}},
    }  # fmt: skip
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def test_health_and_readiness(observed):
    assert observed.get("/healthz") == (200, "ok")
    status, body = observed.get("/readyz")
    report = json.loads(body)
    assert status == 200 and report["ready"] and report["database"] == "ok"
    assert report["connections"]["sandbox"] == "ok"
    assert report["connections"]["down"].startswith("unreachable")  # one cluster down: still ready


def test_metrics_show_a_kubectl_sessions_traffic(observed):
    before = metric(observed.get("/metrics")[1], "kubegate_requests_total", connection="sandbox", verb="list",
                    decision="none", code="200") or 0  # fmt: skip
    for _ in range(3):
        run_kubectl(observed.kubeconfig("alice"), "get", "pods", "-n", "prod", check=True)
    watch = subprocess.Popen([str(VENV_BIN / "kubectl"), "get", "pods", "-n", "prod", "-w"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={"KUBECONFIG": str(observed.kubeconfig("alice")), "PATH": "/usr/bin:/bin",
                                  "HOME": str(observed.dir)})  # fmt: skip

    def open_streams() -> float:
        return metric(observed.get("/metrics")[1], "kubegate_open_streams", connection="sandbox") or 0

    try:
        wait_for(lambda: open_streams() >= 1, "the watch in kubegate_open_streams", timeout=15)
    finally:
        watch.kill()
        watch.wait(10)

    def settled() -> str | None:  # the watch ended, and the audit writer (batches of 50 ms) caught up
        text = observed.get("/metrics")[1]
        streams = metric(text, "kubegate_open_streams", connection="sandbox")
        written = metric(text, "kubegate_audit_written_events", sink="audit-db") or 0
        return text if streams == 0 and written >= 3 else None

    text = wait_for(settled, "no open stream and 3 events written by audit-db in /metrics")
    after = metric(
        text, "kubegate_requests_total", connection="sandbox", verb="list", decision="none", code="200"
    )
    assert after is not None and after >= before + 3
    assert (
        metric(text, "kubegate_request_duration_seconds_count", connection="sandbox", verb="list") or 0
    ) >= 3
    assert metric(text, "kubegate_open_streams", connection="sandbox") == 0  # the watch ended
    assert metric(text, "kubegate_audit_written_events", sink="audit-db") >= 3
    assert metric(text, "kubegate_audit_sink_up", sink="audit-db") == 1
    denied = run_kubectl(observed.kubeconfig("alice", token="not-a-token-00000000"), "get", "pods")
    assert denied.returncode != 0
    text = observed.get("/metrics")[1]
    assert metric(
        text, "kubegate_requests_total", connection="sandbox", decision="unauthenticated", code="401"
    )


def test_json_logs_carry_the_request_id(observed):
    proc = run_kubectl(observed.kubeconfig("alice", "down"), "get", "pods", "--request-timeout=10s")
    assert proc.returncode != 0

    def warnings_logged() -> list[dict]:
        lines = [json.loads(line) for line in observed.log.read_text().splitlines() if line.startswith("{")]
        return [entry for entry in lines if "upstream of down unavailable" in entry["message"]]

    warnings = wait_for(warnings_logged, "the 'upstream of down unavailable' log line")
    assert warnings and all(entry["request_id"] and entry["level"] == "warning" for entry in warnings)
    # the same id the audit store has for that request
    from kubegate.core.db import Database
    from kubegate.plugins.audit import store

    def audited_ids() -> set[str]:  # the event is written after the response, so after the log line
        database = Database(f"sqlite:///{observed.dir / 'state' / 'kubegate.db'}")
        try:
            events = database.call(lambda s: store.search(s, store.Filters(connection="down")))
        finally:
            database.close()
        return {e["request_id"] for e in events}

    wait_for(lambda: warnings[-1]["request_id"] in audited_ids(), "the logged request's audit event")


def test_sigterm_drains_then_stops_within_the_grace_time(sandbox, tmp_path):
    config = gateway_config(sandbox, tmp_path, free_port())
    config["shutdown_grace_seconds"] = 2
    gw = start_gateway(tmp_path, config)
    watch = subprocess.Popen([str(VENV_BIN / "kubectl"), "get", "pods", "-n", "prod", "-w"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"KUBECONFIG": str(gw.kubeconfig("alice")), "PATH": "/usr/bin:/bin",
                                  "HOME": str(tmp_path)})  # fmt: skip
    try:
        assert "web" in watch.stdout.readline() + watch.stdout.readline()
        started = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        code = gw.process.wait(30)
        waited = time.monotonic() - started
        assert code == 0
        assert (
            waited < 15
        )  # the open watch did not hold the process beyond the grace time (plus start-up slack)
    finally:
        watch.kill()
        stop_process(gw.process)


def test_sighup_reloads_the_config_without_dropping_open_streams(sandbox, tmp_path):
    import yaml

    config = gateway_config(sandbox, tmp_path, free_port())
    gw = start_gateway(tmp_path, config)
    watch = subprocess.Popen([str(VENV_BIN / "kubectl"), "get", "pods", "-n", "prod", "-w", "-o", "name"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"KUBECONFIG": str(gw.kubeconfig("alice")), "PATH": "/usr/bin:/bin",
                                  "HOME": str(tmp_path)})  # fmt: skip

    def wait_for_log(text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 20
        while gw.log.read_text().count(text) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.log.read_text().count(text) >= count, gw.log.read_text()[-2000:]

    try:
        pods = run_kubectl(
            gw.kubeconfig("alice"), "get", "pods", "-n", "prod", "-o", "name", check=True
        ).stdout.split()
        listed = [watch.stdout.readline().strip() for _ in pods]  # the watch's initial list
        assert sorted(listed) == sorted(pods)
        before = run_kubectl(gw.kubeconfig("alice", "second"), "get", "pods", "-n", "prod")
        assert before.returncode != 0 and "NotFound" in before.stderr
        config["connections"]["second"] = config["connections"]["sandbox"]
        gw.config.write_text(yaml.safe_dump(config))
        gw.process.send_signal(signal.SIGHUP)
        wait_for_log("configuration reloaded")
        run_kubectl(gw.kubeconfig("alice", "second"), "get", "pods", "-n", "prod", check=True)
        # The watch opened before the reload still streams: a change shows up in it.
        run_kubectl(sandbox.kubeconfig, "label", "pod", "worker", "-n", "prod", f"reloaded={int(time.time())}",
                    "--overwrite", check=True)  # fmt: skip
        seen = [watch.stdout.readline().strip() for _ in range(1)]
        assert seen == ["pod/worker"], seen
        assert watch.poll() is None
        # A config that does not load is refused; the running one stays.
        gw.config.write_text("connections: {second: [not, a, connection]}\n")
        gw.process.send_signal(signal.SIGHUP)
        wait_for_log("reload refused")
        run_kubectl(gw.kubeconfig("alice", "second"), "get", "pods", "-n", "prod", check=True)
        assert gw.process.poll() is None
    finally:
        watch.kill()
        stop_process(gw.process)
