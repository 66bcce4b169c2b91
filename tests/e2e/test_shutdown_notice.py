"""A stop with open streams says what it waits for and how long (issue 16), through a real gateway process
with real kubectl streams open."""

from __future__ import annotations

import signal
import uuid

import pytest
from conftest import gateway_config, start_gateway
from kubetest import Background, run_kubectl

from kubegate.core.testing import free_port, wait_for


def serve(sandbox, tmp_path, grace: float):
    config = gateway_config(sandbox, tmp_path / "gw", free_port())
    config["shutdown_grace_seconds"] = grace
    return start_gateway(tmp_path / "gw", config)


def open_streams(gateway, sandbox) -> list[Background]:
    kubeconfig = gateway.kubeconfig("alice")
    watch = Background(["kubectl", "get", "configmaps", "-n", "prod", "-w"], kubeconfig)
    logs = Background(["kubectl", "logs", "-f", "web", "-n", "prod", "--tail=1"], kubeconfig)
    watch.read_until(r"app-config")  # the list's output: the watch request may not have been sent yet
    # A change the watch prints proves its request is open at the gateway.
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    run_kubectl(sandbox.kubeconfig, "create", "configmap", probe, "-n", "prod", check=True)
    watch.read_until(probe)
    # Other tests list prod's ConfigMaps.
    run_kubectl(sandbox.kubeconfig, "delete", "configmap", probe, "-n", "prod", check=True)
    logs.read_until(r"postgres://")
    return [watch, logs]


def notice(gateway) -> str:
    lines = wait_for(
        lambda: [line for line in gateway.log.read_text().splitlines() if "stopping" in line],
        "the stop notice in the gateway's log",
        timeout=30,
    )
    return lines[0]


@pytest.mark.needs_pods
def test_sigterm_with_open_streams_says_what_it_waits_for_and_how_long(sandbox, tmp_path):
    gateway = serve(sandbox, tmp_path, grace=8)
    streams = open_streams(gateway, sandbox)
    session = Background(
        ["kubectl", "exec", "web", "-n", "prod", "--", "sh", "-c", "echo started; sleep 300"],
        gateway.kubeconfig("alice"),
    )
    try:
        session.read_until("started")
        gateway.process.send_signal(signal.SIGTERM)
        line = notice(gateway)
        assert line.endswith(
            "stopping: waiting up to 8 s for 2 open requests (1 logs -f, 1 watch) to end; "
            "closing 1 open session (1 exec); Ctrl-C again to stop now"
        ), line
        # What it says is what it does: the exec session ends now, while the streams go on (for the grace
        # period), then the process ends.
        session.proc.wait(15)
        assert all(stream.alive() for stream in streams)
        assert gateway.process.wait(60) == 0
    finally:
        for stream in [*streams, session]:
            stream.stop()
        if gateway.process.poll() is None:
            gateway.stop()


@pytest.mark.needs_pods
def test_second_ctrl_c_stops_without_waiting(sandbox, tmp_path):
    gateway = serve(sandbox, tmp_path, grace=600)
    streams = open_streams(gateway, sandbox)
    try:
        gateway.process.send_signal(signal.SIGINT)
        assert "waiting up to 600 s for 2 open requests" in notice(gateway)
        gateway.process.send_signal(signal.SIGINT)
        # Far below the 600 s grace: the second Ctrl-C did not wait for the streams.
        gateway.process.wait(60)
    finally:
        for stream in streams:
            stream.stop()
        if gateway.process.poll() is None:
            gateway.stop()


def test_stop_without_open_streams_says_so(sandbox, tmp_path):
    gateway = serve(sandbox, tmp_path, grace=30)
    try:
        gateway.process.send_signal(signal.SIGTERM)
        assert notice(gateway).endswith("stopping (no open requests)")
        assert gateway.process.wait(60) == 0
    finally:
        if gateway.process.poll() is None:
            gateway.stop()
