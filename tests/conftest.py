"""Shared fixtures: real processes (sandbox cluster, gateway) and real clients (kubectl, kubernetes, websockets).

Everything is started as a subprocess and talked to over TLS on loopback, the way a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubetest import KUBECTL, kubectl_binaries, run_kubectl  # noqa: F401 - re-exported for tests

VENV_BIN = Path(sys.executable).parent


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
            items = json.loads(resp.read())["items"]
        # The log's own reads are recorded too; leave them out.
        return [item for item in items if not item["path"].startswith("/sandbox/")]


def start_sandbox(directory: Path) -> Sandbox:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubegate.sandbox", "serve", "--dir", str(directory), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=open(directory / "sandbox.log", "wb"),
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


# ---------------------------------------------------------------------------------------------------------
# The gateway, as a real `kubegate serve` process in front of the sandbox
# ---------------------------------------------------------------------------------------------------------

GATEWAY_USERS = {
    # user: (groups, token)
    "alice": (["developers"], "alice-token-0123456789abcdef"),
    "bob": (["readonly"], "bob-token-0123456789abcdef"),
    "ci-bot": (["ci", "deployers"], "ci-bot-token-0123456789abcdef"),
}


CI_BOT_UID = "uid-ci-bot-42"


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so no process binding port 0 (a sandbox, an IdP, an
    outgoing connection) can take it between this call and the server that binds it."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@dataclass
class Gateway:
    """A running `kubegate serve` process."""

    dir: Path
    url: str
    config: Path
    ca_file: Path
    process: subprocess.Popen
    log: Path

    def connection_url(self, name: str) -> str:
        return f"{self.url}/k8s/{name}"

    def kubeconfig(self, user: str = "alice", connection: str = "sandbox", token: str | None = None) -> Path:
        """A kubeconfig for `user` (a GATEWAY_USERS name) reaching `connection` through the gateway."""
        import base64

        import yaml

        token = token if token is not None else GATEWAY_USERS[user][1]
        path = self.dir / f"kubeconfig-{user}-{connection}-{abs(hash(token))}"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": connection,
                    "cluster": {
                        "server": self.connection_url(connection),
                        "certificate-authority-data": base64.b64encode(self.ca_file.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token} if token else {}}],
            "contexts": [{"name": "gw", "context": {"cluster": connection, "user": user}}],
            "current-context": "gw",
        }
        path.write_text(yaml.safe_dump(doc))
        return path


def gateway_config(
    sandbox: Sandbox, directory: Path, port: int, extra_connections: dict | None = None
) -> dict:
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "upstream-token").write_text(sandbox.token)
    tokens = [
        {"user": user, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for user, (groups, token) in GATEWAY_USERS.items()
    ]
    next(t for t in tokens if t["user"] == "ci-bot")["uid"] = CI_BOT_UID  # sent as Impersonate-Uid
    return {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(directory / "state"),
        "limits": {"max_request_body_bytes": 1024 * 1024, "upstream_connect_timeout_seconds": 2},
        "connections": {
            "sandbox": {
                "upstream": {
                    "server": sandbox.url,
                    "certificate_authority": str(sandbox.ca_file),
                    "token_file": str(directory / "upstream-token"),
                },
                "plugins": {"static-tokens": {"tokens": tokens}},
            },
            **(extra_connections or {}),
        },
    }


PLUGIN_FIXTURE = Path(__file__).parent / "plugins_fixture"


def start_gateway(directory: Path, config: dict, *, with_test_plugin: bool = False) -> Gateway:
    import ssl
    import urllib.request

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "kubegate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = directory / "gateway.log"
    env = dict(os.environ)
    if with_test_plugin:
        # Installed the way third-party plugins are: a distribution with a `kubegate` entry point.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_FIXTURE), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [str(VENV_BIN / "kubegate"), "serve", "--config", str(config_path)],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"https://{config['listen']}"
    ca_file = Path(config["state_dir"]) / "tls" / "ca.crt"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited ({proc.returncode}): {log.read_text()}")
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            with urllib.request.urlopen(f"{url}/healthz", context=ctx, timeout=2) as resp:
                if resp.status == 200:
                    break
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"gateway did not start: {log.read_text()}")
    return Gateway(dir=directory, url=url, config=config_path, ca_file=ca_file, process=proc, log=log)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def gateway(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway in front of the sandbox. Connections (all to the same sandbox unless said):

    - `sandbox`: token-file credential, static-tokens only;
    - `down`: nothing listens at its server;
    - `guarded`: also the third-party `testplugin` (deny namespace deletes, audit to a file, hooks);
    - `by-cert`: the gateway's credential is a client certificate;
    - `by-kubeconfig`: the gateway's credential comes from a kubeconfig;
    - `rotating`: token-file credential in a file the tests rewrite;
    - `blackhole`: its server accepts TCP connections and never says a word.
    """
    import socket

    directory = tmp_path_factory.mktemp("gateway")
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)  # the kernel completes handshakes; nobody ever accepts or answers
    config = gateway_config(sandbox, directory, free_port())
    tokens = config["connections"]["sandbox"]["plugins"]
    (directory / "rotating-token").write_text(sandbox.token)

    def connection(upstream: dict, plugins: dict | None = None) -> dict:
        return {"upstream": upstream, "plugins": {**tokens, **(plugins or {})}}

    token_upstream = config["connections"]["sandbox"]["upstream"]
    config["connections"].update(
        {
            "down": connection({**token_upstream, "server": f"https://127.0.0.1:{free_port()}"}),
            "guarded": connection(
                token_upstream, {"testplugin": {"audit_file": str(directory / "audit.jsonl")}}
            ),
            "by-cert": connection(
                {
                    "server": sandbox.url,
                    "certificate_authority": str(sandbox.ca_file),
                    "client_certificate": str(sandbox.dir / "client.crt"),
                    "client_key": str(sandbox.dir / "client.key"),
                }
            ),
            "by-kubeconfig": connection({"kubeconfig": str(sandbox.kubeconfig)}),
            "rotating": connection({**token_upstream, "token_file": str(directory / "rotating-token")}),
            "blackhole": connection(
                {**token_upstream, "server": f"https://127.0.0.1:{blackhole.getsockname()[1]}"}
            ),
        }
    )
    gw = start_gateway(directory, config, with_test_plugin=True)
    yield gw
    stop_process(gw.process)
    blackhole.close()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the test session's own (skips when Debian's postgresql is not installed)."""
    import shutil
    import tempfile

    from postgres import start_postgres

    # Not under pytest's temporary folder: that is private to root, and the server runs as `postgres`.
    directory = Path(tempfile.mkdtemp(prefix="kubegate-pg-"))
    try:
        server = start_postgres(directory, free_port())
        yield server
        server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def agent_gateway(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory):
    """A gateway whose connection `edge` is served by a `kubegate agent` over its SSH tunnel (the gateway
    holds no address or credential for the sandbox): an `e2e.agent_stack.AgentStack`."""
    from e2e.agent_stack import start_agent_stack  # imports this module: only once it is loaded

    stack = start_agent_stack(sandbox, tmp_path_factory.mktemp("agent"))
    yield stack
    stack.agent.stop()
    stop_process(stack.gateway.process)
