"""Shared fixtures: real processes (sandbox cluster, gateway) and real clients (kubectl, kubernetes, websockets).

Everything is started as a subprocess and talked to over TLS on loopback, the way a user would run it. The
sandbox and gateway processes are started by `kubegate.testing`, the fixtures plugin authors get; this
file adds what only the project's own tests need (the users, the many connections of `gateway`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from kubetest import KUBECTL, kubectl_binaries, run_kubectl  # noqa: F401 - re-exported for tests

try:
    from kubegate import testing
except ImportError:  # the kubegate.testing name is mapped in pyproject.toml; the module is core/testing
    from kubegate.core import testing

VENV_BIN = Path(sys.executable).parent

# The sandbox cluster of the session is kubegate.testing's fixture; tests name its type and start more.
Sandbox = testing.Sandbox
start_sandbox = testing.start_sandbox
sandbox = testing.sandbox
free_port = testing.free_port


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


@dataclass
class Gateway(testing.GatewayProcess):
    """A running `kubegate serve` process (kubegate.testing's), with kubeconfigs for GATEWAY_USERS."""

    # Not GatewayProcess.kubeconfig's (connection, user, token): the suite's users by name, alice by default.
    def kubeconfig(  # type: ignore[override]
        self, user: str = "alice", connection: str = "sandbox", token: str | None = None
    ) -> Path:
        """A kubeconfig for `user` (a GATEWAY_USERS name) reaching `connection` through the gateway; with
        `token` "" it sends no credential at all."""
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

    def get(self, path: str) -> tuple[int, str]:
        """GET one of the gateway's own paths (`/readyz`, `/metrics`) over its TLS: status and body."""
        import ssl
        import urllib.error
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(f"{self.url}{path}", context=context, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `needs_pods` run a process in a sandbox pod (exec, logs, attach, cp, port-forward, a
    pod's status). Where pods cannot be confined (no user namespaces, no proot) they fail closed, so those
    tests skip, as the README says — the probe runs once, and only when such a test was collected."""
    marked = [item for item in items if item.get_closest_marker("needs_pods")]
    if not marked:
        return
    from kubegate.sandbox.runtime import configured_isolation

    if configured_isolation() is not None:
        return
    skip = pytest.mark.skip(
        reason="pods cannot be confined here: no proot and no user namespaces (they fail closed)"
    )
    for item in marked:
        item.add_marker(skip)


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
    """`kubegate serve` with `config` (its `listen` kept) in `directory`; returns once /healthz answers."""
    pythonpath = []
    if with_test_plugin:
        # Installed the way third-party plugins are: a distribution with a `kubegate` entry point.
        pythonpath.append(PLUGIN_FIXTURE)
    started = testing.start_gateway_process(
        config, directory, pythonpath=pythonpath, listen=config.get("listen")
    )
    return Gateway(**{f.name: getattr(started, f.name) for f in fields(started)})


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
