"""Two gateway replicas on one PostgreSQL behind a round-robin load balancer, driven with real kubectl: a
request held on one replica is approved through the other; a grant made through one is used and revoked
through the other; a token revoked is refused by both within a second or so."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import KUBECTL, run_kubectl, wait_for

from kubegate.core.kubeconfig import dump, gateway_kubeconfig
from kubegate.core.tls import ensure_self_signed

POLICY = {"default": "allow", "rules": [
    {"name": "deletes-in-prod", "match": {"verbs": ["delete"], "namespaces": ["prod"]}, "action": "approve",
     "message": "deleting in prod needs a reviewer", "approval": {"reviewer_groups": ["readonly"]}},
    {"name": "shell-into-prod", "match": {"resources": ["pods/exec"], "namespaces": ["prod"]}, "action": "approve",
     "message": "shell access", "approval": {"reviewer_groups": ["readonly"], "scope": "window",
                                             "window_seconds": 3600}}]}  # fmt: skip


class RoundRobin:
    """A TCP load balancer: each new connection goes to the next backend (TLS passes through)."""

    def __init__(self, backends: list[int]):
        self.port = free_port()
        self.backends = itertools.cycle(backends)
        self.served: dict[int, int] = {port: 0 for port in backends}
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        started.set()
        self.loop.run_until_complete(server.serve_forever())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = next(self.backends)
        self.served[port] += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture
def replicas(sandbox, tmp_path) -> Iterator[tuple[list[Gateway], RoundRobin, Path, str]]:
    from postgres import start_postgres

    pg_dir = Path(tempfile.mkdtemp(prefix="kubegate-pg-replicas-"))
    server = start_postgres(pg_dir, free_port())
    tls = ensure_self_signed(tmp_path / "tls", common_name="kubegate", hostnames=["127.0.0.1"])
    ports = [free_port(), free_port()]
    gateways = []
    for index, port in enumerate(ports):
        config = gateway_config(sandbox, tmp_path / f"replica-{index}", port)
        config["database"] = {"url": server.url}
        config["tls"] = {"cert_file": str(tls.cert), "key_file": str(tls.key)}
        config["connections"]["sandbox"]["plugins"].update({"policy": POLICY, "approvals": {}, "login": {}})
        (Path(config["state_dir"]) / "tls").mkdir(parents=True, exist_ok=True)
        (Path(config["state_dir"]) / "tls" / "ca.crt").write_bytes(
            tls.ca_cert.read_bytes()
        )  # for start_gateway
        gateways.append(start_gateway(tmp_path / f"replica-{index}", config))
    balancer = RoundRobin(ports)
    try:
        yield gateways, balancer, tls.ca_cert, server.url
    finally:
        for gw in gateways:
            stop_process(gw.process)
        server.stop()


def kubeconfig(path: Path, url: str, ca: Path, token: str) -> Path:
    path.write_text(dump(gateway_kubeconfig(cluster="sandbox", server=f"{url}/k8s/sandbox", ca_pem=ca.read_bytes(),
                                            users=[("alice", token)])))  # fmt: skip
    return path


def kubegate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "kubegate"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.needs_pods
def test_two_replicas_share_approvals_grants_and_revocations(replicas, sandbox, tmp_path):
    from conftest import GATEWAY_USERS

    sandbox_kubeconfig = sandbox.kubeconfig
    gateways, balancer, ca, database_url = replicas
    url = f"https://127.0.0.1:{balancer.port}"
    alice = kubeconfig(tmp_path / "alice", url, ca, GATEWAY_USERS["alice"][1])
    target = ["--gateway", url, "--connection", "sandbox", "--certificate-authority", str(ca)]
    bob = ["--token", GATEWAY_USERS["bob"][1]]  # bob is in `readonly`: a reviewer here

    # Held on one replica, approved through the load balancer (the next connection: the other replica).
    # (the session's sandbox is shared: delete something of this test's own, not a seeded pod)
    name = f"replica-test-{int(time.time())}"
    run_kubectl(
        sandbox_kubeconfig, "create", "configmap", name, "-n", "prod", "--from-literal=a=b", check=True
    )
    held = subprocess.Popen([KUBECTL, "delete", "configmap", name, "-n", "prod"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": str(alice)})  # fmt: skip

    def held_delete() -> str | None:
        listed = kubegate("approvals", "list", *target, *bob, "-o", "json")
        assert listed.returncode == 0, listed.stderr
        return next((r["id"] for r in json.loads(listed.stdout) if r["name"] == name), None)

    found = wait_for(held_delete, f"the delete of configmap {name} to be held", timeout=20)
    assert held.poll() is None
    approved_at = time.monotonic()
    assert kubegate("approvals", "approve", found, *target, *bob).returncode == 0
    out, err = held.communicate(timeout=30)
    assert held.returncode == 0 and f'configmap "{name}" deleted' in out, err
    assert time.monotonic() - approved_at < 5

    # A window grant approved through one replica lets alice exec through both, until revoked.
    shell = subprocess.Popen([KUBECTL, "exec", "web", "-n", "prod", "--", "echo", "first"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": str(alice)})  # fmt: skip

    def held_exec() -> str | None:
        listed = json.loads(kubegate("approvals", "list", *target, *bob, "-o", "json").stdout)
        return next((r["id"] for r in listed if r["resource"] == "pods/exec"), None)

    found = wait_for(held_exec, "alice's exec to be held", timeout=20)
    assert kubegate("approvals", "approve", found, *target, *bob).returncode == 0
    assert shell.communicate(timeout=30)[0].strip() == "first"
    for _ in range(4):  # through both replicas, no new approval needed
        run_kubectl(alice, "exec", "web", "-n", "prod", "--", "true", check=True)
    config = str(gateways[0].config)
    grants = kubegate("grants", "list", "--config", config)
    grant_id = next(line.split()[0] for line in grants.stdout.splitlines() if "shell-into-prod" in line)
    assert kubegate("grants", "revoke", grant_id, "--config", config).returncode == 0
    # Kept: nothing to poll for without sending an exec, and an exec sent while a replica still honours
    # the revoked grant runs instead of being held (failing the check below).
    time.sleep(1.5)
    # Neither replica honours it any more: each new exec is held for a reviewer again.
    before = {r["id"] for r in json.loads(kubegate("approvals", "list", *target, *bob, "-o", "json").stdout)}
    for attempt in range(2):
        again = subprocess.Popen([KUBECTL, "exec", "web", "-n", "prod", "--", "echo", f"again-{attempt}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "KUBECONFIG": str(alice)})  # fmt: skip
        try:

            def new_exec_requests(seen: set[str] = before) -> list[dict]:
                listed = json.loads(kubegate("approvals", "list", *target, *bob, "-o", "json").stdout)
                return [r for r in listed if r["resource"] == "pods/exec" and r["id"] not in seen]

            held_again = wait_for(new_exec_requests, f"exec attempt {attempt} to be held again", timeout=20)
            assert again.poll() is None
            before |= {r["id"] for r in held_again}
        finally:
            again.kill()

    # A gateway token revoked in the database is refused by both replicas.
    from kubegate.core.db import Database
    from kubegate.plugins.login import store as login_store

    database = Database(database_url)
    token, record = database.call(lambda s: login_store.mint_token(
        s, {"user": "carol", "groups": ["developers"], "method": "login:test"}, ttl_seconds=3600,
        connection=None, description="replica test"))  # fmt: skip
    database.close()
    carol = kubeconfig(tmp_path / "carol", url, ca, token)
    for _ in range(2):
        run_kubectl(carol, "auth", "whoami", check=True)
    assert kubegate("tokens", "revoke", record.id, "--config", config).returncode == 0

    def refused_four_times_in_a_row() -> bool:  # the balancer alternates: both replicas refuse
        for _ in range(4):
            refused = run_kubectl(carol, "auth", "whoami")
            if refused.returncode == 0 or "Unauthorized" not in refused.stderr:
                return False
        return True

    # Each replica re-reads revocations every revocation_check_seconds (1 s).
    wait_for(refused_four_times_in_a_row, "both replicas to refuse carol's revoked token", timeout=15)
    assert all(count > 2 for count in balancer.served.values()), balancer.served  # both replicas served
