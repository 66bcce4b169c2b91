"""An attack on known-value masking: whoever may create Secrets floods the set the gateway learns.

The gateway learns at most `known_values.max_values` values, longest first. Secrets with more (and longer)
values than that used to push the real ones out of the set, silently — after which a Secret's value copied
into a ConfigMap, a log line or exec output went out in clear. Now the follower reports that it is over
its bound, and the connection refuses (503) until the Secrets fit again. Real kubectl, the real gateway,
the sandbox's watch."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator

import pytest
import yaml
from conftest import Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl, wait_for

from kubegate.sandbox.seed import DB_PASSWORD

MARKER = "<masked by kubegate>"
MAX_VALUES = 40


@pytest.fixture
def gateways(sandbox, tmp_path) -> Iterator[Callable[[], Gateway]]:
    """Starts the gateway (again: a restart lists the Secrets afresh, in the API server's order)."""
    config = gateway_config(sandbox, tmp_path, free_port())
    plain = config["connections"]["sandbox"]
    config["connections"]["masked"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {"static-tokens": plain["plugins"]["static-tokens"],
                    "masking": {"known_values": {"max_values": MAX_VALUES}}},
    }  # fmt: skip
    running: list[Gateway] = []

    def start() -> Gateway:
        while running:
            stop_process(running.pop().process)
        running.append(start_gateway(tmp_path, config))
        return running[-1]

    yield start
    for gw in running:
        stop_process(gw.process)


def test_a_flood_of_secrets_refuses_rather_than_forget_a_value(gateways, tmp_path):
    # Listed before `prod` (the API server lists in key order): a fresh list meets the flood first.
    namespace = f"aaa-flood-{uuid.uuid4().hex[:8]}"
    gateway = gateways()
    plain, masked = gateway.kubeconfig("alice", "sandbox"), gateway.kubeconfig("alice", "masked")
    run_kubectl(plain, "create", "namespace", namespace, check=True)
    try:
        # A Secret's value copied where only known-value masking finds it.
        run_kubectl(plain, "create", "configmap", "notes", "-n", namespace,
                    f"--from-literal=note=the db password is {DB_PASSWORD}", check=True)  # fmt: skip

        def note() -> tuple[int, str, str]:
            proc = run_kubectl(
                masked, "get", "configmap", "notes", "-n", namespace, "-o", "yaml", check=False
            )
            assert DB_PASSWORD not in proc.stdout + proc.stderr
            return proc.returncode, proc.stdout, proc.stderr

        code, out, _ = note()
        assert code == 0 and yaml.safe_load(out)["data"]["note"] == f"the db password is {MARKER}"

        # More values than MAX_VALUES, each longer than the real ones.
        flood = {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"junk-{i}", "namespace": namespace},
             "stringData": {"v": secrets.token_hex(32)}} for i in range(MAX_VALUES + 5)]}  # fmt: skip
        path = tmp_path / "flood.yaml"
        path.write_text(yaml.safe_dump(flood))
        # --validate=false: kubectl validates a `List` against /openapi/v2, which the sandbox does not serve.
        run_kubectl(plain, "apply", "--validate=false", "-f", str(path), check=True)

        def answered(refusing: bool) -> tuple[int, str, str] | None:
            result = note()
            return result if (result[0] != 0) == refusing else None

        refused = wait_for(lambda: answered(refusing=True), what="the connection refusing")
        assert refused[2].startswith("Error from server (ServiceUnavailable): masking on connection masked")
        assert f"more than known_values.max_values ({MAX_VALUES})" in refused[2]

        # After a restart, the first list meets the flood before the real values (which a bound that kept
        # the first values found used to drop): still refused, never in clear.
        gateway = gateways()
        code, _, stderr = note()
        assert code == 1 and f"more than known_values.max_values ({MAX_VALUES})" in stderr

        run_kubectl(plain, "delete", "secrets", "--all", "-n", namespace, check=True)
        code, out, _ = wait_for(lambda: answered(refusing=False), what="serving again")
        assert yaml.safe_load(out)["data"]["note"] == f"the db password is {MARKER}"
    finally:
        run_kubectl(plain, "delete", "namespace", namespace, "--wait=false", check=False)
