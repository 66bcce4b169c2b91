"""`kubegate serve --bind` serves on the given address and says so: the banner's URLs are the ones that
answer, not those of `listen` in the config (a new user's first `--bind 0.0.0.0:…` read the wrong port)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import GATEWAY_USERS, gateway_config
from kubetest import run_kubectl

from kubegate.core.testing import free_port, wait_for

KUBEGATE = str(Path(sys.executable).parent / "kubegate")


def test_the_banner_names_the_bound_address_and_kubectl_reaches_it(sandbox, tmp_path):
    configured, bound = free_port(), free_port()
    config = gateway_config(sandbox, tmp_path, configured)
    (tmp_path / "kubegate.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [KUBEGATE, "serve", "--config", str(tmp_path / "kubegate.yaml"), "--bind", f"127.0.0.1:{bound}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        banner = wait_for(
            lambda: [line for line in log.read_text().splitlines() if "  sandbox: " in line],
            "the banner's connection line",
            timeout=30,
        )[0]
        assert f"https://127.0.0.1:{bound}/k8s/sandbox ->" in banner, banner
        assert str(configured) not in log.read_text()
        ca = next(line for line in log.read_text().splitlines() if "clients must trust" in line).split()[-1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "gw", "cluster": {"server": banner.split()[1], "certificate-authority": ca}}
                    ],
                    "users": [{"name": "alice", "user": {"token": GATEWAY_USERS["alice"][1]}}],
                    "contexts": [{"name": "gw", "context": {"cluster": "gw", "user": "alice"}}],
                    "current-context": "gw",
                }
            )
        )
        proc_get = run_kubectl(kubeconfig, "get", "namespaces", check=True)
        assert "prod" in proc_get.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
