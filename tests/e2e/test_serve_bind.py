"""`kubegate serve --bind` serves on the given address and says so: the banner's URLs are the ones that
answer, not those of `listen` in the config (a new user's first `--bind 0.0.0.0:…` read the wrong port);
`listen: HOST:0` serves on a free port and prints it (it printed nothing)."""

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


def serve_and_read_banner(tmp_path: Path, config: dict, *args: str) -> tuple[subprocess.Popen, str, str]:
    """`kubegate serve` with `config` and `args`: the process, the banner's connection line, the whole log."""
    (tmp_path / "kubegate.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [KUBEGATE, "serve", "--config", str(tmp_path / "kubegate.yaml"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    banner = wait_for(
        lambda: [line for line in log.read_text().splitlines() if "  sandbox: " in line],
        "the banner's connection line",
        timeout=30,
    )[0]
    return proc, banner, log.read_text()


def kubectl_through(tmp_path: Path, banner: str, log_text: str) -> str:
    """`kubectl get namespaces` as alice, at the URL the banner printed."""
    ca = next(line for line in log_text.splitlines() if "clients must trust" in line).split()[-1]
    kubeconfig = tmp_path / "kubeconfig"
    cluster = {"server": banner.split()[1], "certificate-authority": ca}
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gw", "cluster": cluster}],
                "users": [{"name": "alice", "user": {"token": GATEWAY_USERS["alice"][1]}}],
                "contexts": [{"name": "gw", "context": {"cluster": "gw", "user": "alice"}}],
                "current-context": "gw",
            }
        )
    )
    return run_kubectl(kubeconfig, "get", "namespaces", check=True).stdout


def test_the_banner_names_the_bound_address_and_kubectl_reaches_it(sandbox, tmp_path):
    configured, bound = free_port(), free_port()
    proc, banner, log_text = serve_and_read_banner(
        tmp_path, gateway_config(sandbox, tmp_path, configured), "--bind", f"127.0.0.1:{bound}"
    )
    try:
        assert f"https://127.0.0.1:{bound}/k8s/sandbox ->" in banner, banner
        assert str(configured) not in log_text
        assert "prod" in kubectl_through(tmp_path, banner, log_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_listen_on_port_0_serves_on_a_free_port_and_says_which(sandbox, tmp_path):
    config = gateway_config(sandbox, tmp_path, 0)
    assert config["listen"] == "127.0.0.1:0"
    proc, banner, log_text = serve_and_read_banner(tmp_path, config)
    try:
        port = int(banner.split()[1].split("/")[2].rsplit(":", 1)[1])
        assert port != 0, banner
        assert "prod" in kubectl_through(tmp_path, banner, log_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
