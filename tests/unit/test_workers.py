"""`workers`: the setting, which configurations may run in several processes, and the metrics a worker adds
for collectors of live in-process state. The processes themselves are tested in tests/e2e/test_workers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kubetest import base_config
from prometheus_client.core import GaugeMetricFamily

from kubegate.core.config import MAX_WORKERS, ConfigError, parse_settings, worker_count
from kubegate.core.gateway import Gateway
from kubegate.core.observe import REGISTRY, _ThisWorker
from kubegate.core.server import worker_conflicts


def settings_with(tmp_path: Path, **top: object):
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump({**base_config(tmp_path), **top}))
    return parse_settings(path)


def gateway_with(tmp_path: Path, config: dict) -> Gateway:
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    return Gateway.from_config(path)


def test_workers_defaults_to_one_process(tmp_path):
    assert worker_count(settings_with(tmp_path)) == 1


@pytest.mark.parametrize("value", [1, 2, 16, MAX_WORKERS])
def test_workers_takes_an_integer_in_range(tmp_path, value):
    assert worker_count(settings_with(tmp_path, workers=value)) == value


def test_workers_auto_is_the_usable_cpus(tmp_path):
    assert worker_count(settings_with(tmp_path, workers="auto")) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, True, "two", "2", 1.5, None])
def test_workers_refuses_anything_else(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        settings_with(tmp_path, workers=value)
    assert caught.value.key == "workers"
    assert caught.value.reason == f"must be an integer from 1 to {MAX_WORKERS}, or auto"


def test_one_worker_runs_every_configuration(tmp_path):
    config = base_config(tmp_path)
    config["connections"]["edge"] = {"type": "agent", "upstream": {}}
    config["connections"]["prod"]["plugins"]["audit-file"] = {}
    assert worker_conflicts(gateway_with(tmp_path, config), 1) is None


def test_several_workers_refuse_agents_and_single_process_audit_sinks(tmp_path):
    plain = base_config(tmp_path)
    assert worker_conflicts(gateway_with(tmp_path, plain), 2) is None

    agent = base_config(tmp_path)
    agent["connections"]["edge"] = {"type": "agent", "upstream": {}}
    found = worker_conflicts(gateway_with(tmp_path, agent), 2)
    assert found is not None and found.endswith("workers: agent connections need workers: 1 for now")

    listener_only = base_config(tmp_path)  # a `plugins.agents` block starts the SSH listener too
    listener_only["plugins"] = {"agents": {}}
    assert "agent connections need workers: 1" in (
        worker_conflicts(gateway_with(tmp_path, listener_only), 2) or ""
    )

    for sink in ("audit-file", "audit-webhook"):
        config = base_config(tmp_path)
        config["connections"]["prod"]["plugins"][sink] = {}
        if sink == "audit-webhook":  # its settings are gateway-wide
            config["plugins"] = {sink: {"url": "https://siem.example"}}
        assert f"{sink} needs workers: 1 for now" in (
            worker_conflicts(gateway_with(tmp_path, config), 2) or ""
        )

    audit_db = base_config(tmp_path)
    audit_db["connections"]["prod"]["plugins"]["audit-db"] = {}
    assert worker_conflicts(gateway_with(tmp_path, audit_db), 2) is None


def test_collectors_of_live_state_answer_for_this_worker_with_its_pid():
    class Live:
        def collect(self):
            family = GaugeMetricFamily("test_live_things", "Things open in this process.", labels=["kind"])
            family.add_metric(["a"], 3)
            yield family

    live = Live()
    REGISTRY.register(live)  # type: ignore[arg-type]
    try:
        families = list(_ThisWorker().collect())
    finally:
        REGISTRY.unregister(live)  # type: ignore[arg-type]
    # The gateway's own metrics (prometheus-client objects) are in the multiprocess files, not here.
    assert [f.name for f in families] == ["test_live_things"]
    assert [(s.labels, s.value) for s in families[0].samples] == [
        ({"kind": "a", "worker": str(os.getpid())}, 3)
    ]
