"""`workers: 2`: one listener, two `kubegate serve` worker processes under a supervisor, driven with real
kubectl and HTTPS clients.

A connection lands on whichever worker accepts it first; where a test must know which worker serves what,
it opens connections until one is accepted by the worker it wants (psutil tells which process holds the
accepted socket) and sends its request on that connection.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import GATEWAY_USERS, VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import KUBECTL, run_kubectl, wait_for

POLICY = {"default": "allow", "rules": [
    {"name": "deletes-in-prod", "match": {"verbs": ["delete"], "namespaces": ["prod"]}, "action": "approve",
     "message": "deleting in prod needs a reviewer", "approval": {"reviewer_groups": ["readonly"]}}]}  # fmt: skip
ALICE, BOB = GATEWAY_USERS["alice"][1], GATEWAY_USERS["bob"][1]  # bob is in `readonly`: a reviewer


# -- helpers --------------------------------------------------------------------------------------------------


def start_workers(directory: Path, config: dict) -> Gateway:
    """`kubegate serve` with `config`; returns once the supervisor printed its banner (every worker serves)."""
    gateway = start_gateway(directory, config)
    deadline = time.monotonic() + 30
    while "workers (pids" not in gateway.log.read_text():
        assert gateway.process.poll() is None, gateway.log.read_text()
        assert time.monotonic() < deadline, f"no banner: {gateway.log.read_text()}"
        time.sleep(0.1)
    return gateway


def worker_pids(gateway: Gateway, count: int = 2, timeout: float = 30) -> list[int]:
    """The supervisor's children once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        pids = sorted(c.pid for c in psutil.Process(gateway.process.pid).children())
        if len(pids) == count:
            return pids
        assert time.monotonic() < deadline, f"workers: {pids}\n{gateway.log.read_text()}"
        time.sleep(0.1)


def port_of(gateway: Gateway) -> int:
    return int(gateway.url.rpartition(":")[2])


def holder(gateway: Gateway, client_port: int, pids: list[int]) -> int | None:
    """The worker holding the accepted end of the client's connection from `client_port`."""
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port and conn.laddr.port == port_of(gateway):
                return pid
    return None


def connect(gateway: Gateway) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", port_of(gateway), context=context, timeout=30)
    conn.connect()  # TLS done: a worker has accepted it
    return conn


def connection_to(gateway: Gateway, pid: int, pids: list[int]) -> http.client.HTTPSConnection:
    """An HTTPS connection served by worker `pid`."""
    for _ in range(300):
        conn = connect(gateway)
        assert conn.sock is not None
        if holder(gateway, conn.sock.getsockname()[1], pids) == pid:
            return conn
        conn.close()
    raise AssertionError(f"no connection landed on worker {pid} in 300 tries")


def call(
    conn: http.client.HTTPSConnection, method: str, path: str, token: str = "", body: bytes | None = None
):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def metrics_dir(gateway: Gateway) -> Path:
    state = Path(yaml.safe_load(gateway.config.read_text())["state_dir"])
    found = list(state.glob(f"metrics-{gateway.process.pid}-*"))
    assert len(found) == 1, found
    return found[0]


def per_worker(gateway: Gateway, kind: str, metric: str) -> dict[int, float]:
    """`metric`'s value in each process's multiprocess file of `kind` (e.g. `counter`, `gauge_sum`)."""
    from prometheus_client.mmap_dict import MmapedDict

    values: dict[int, float] = {}
    for path in metrics_dir(gateway).glob(f"{kind}_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[0] == metric:  # [metric, sample, labels, help]
                values[pid] = values.get(pid, 0.0) + value
    return values


def scrape(conn: http.client.HTTPSConnection) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = call(conn, "GET", "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple], float], name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def kubectl_many(kubeconfig: Path, count: int, *args: str) -> None:
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda _: run_kubectl(kubeconfig, *args), range(count)))
    failed = [r.stderr for r in results if r.returncode != 0]
    assert not failed, failed[:3]


def add_token(gateway: Gateway, user: str, token: str, drop: str | None = None) -> None:
    """Rewrite the config file: `user` gets `token`; `drop`'s token goes. (SIGHUP is the caller's.)"""
    config = yaml.safe_load(gateway.config.read_text())
    tokens = config["connections"]["sandbox"]["plugins"]["static-tokens"]["tokens"]
    tokens[:] = [t for t in tokens if t["user"] != drop]
    tokens.append(
        {"user": user, "groups": ["developers"], "sha256": hashlib.sha256(token.encode()).hexdigest()}
    )
    gateway.config.write_text(yaml.safe_dump(config))


def answers(gateway: Gateway, pid: int, pids: list[int], token: str) -> int:
    conn = connection_to(gateway, pid, pids)
    try:
        return call(conn, "GET", "/k8s/sandbox/api/v1/namespaces/default/configmaps", token)[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def workers(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("workers")
    config = gateway_config(sandbox, directory, free_port())
    config["workers"] = 2
    config["connections"]["sandbox"]["plugins"].update({"policy": POLICY, "approvals": {}, "audit-db": {}})
    gateway = start_workers(directory, config)
    yield gateway
    stop_process(gateway.process)


# -- the tests ------------------------------------------------------------------------------------------------


def test_requests_spread_over_both_workers_and_metrics_add_up(workers, sandbox):
    pids = worker_pids(workers)
    alice = workers.kubeconfig("alice")
    served: dict[int, float] = {}
    for _ in range(5):  # the kernel picks the worker: go on until both have served (almost always at once)
        kubectl_many(alice, 12, "get", "configmaps", "-n", "default")
        served = per_worker(workers, "counter", "kubegate_requests")
        if all(served.get(pid, 0) > 0 for pid in pids):
            break
    assert all(served.get(pid, 0) > 0 for pid in pids), served
    assert set(served) <= set(pids)  # the supervisor serves nothing

    # Either worker's /metrics is the sum over both.
    for pid in pids:
        conn = connection_to(workers, pid, pids)
        samples = scrape(conn)
        conn.close()
        assert total(samples, "kubegate_requests_total") == sum(served.values())

    # A gauge of live state: a watch held by one worker shows in the scrape the other answers.
    watch = subprocess.Popen([KUBECTL, "get", "configmaps", "-n", "default", "-w"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "KUBECONFIG": str(alice)})  # fmt: skip
    try:

        def watching_worker() -> int | None:
            for conn in psutil.Process(watch.pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == port_of(workers):
                    return holder(workers, conn.laddr.port, pids)
            return None

        wait_for(lambda: watching_worker() is not None, what="the watch's connection")
        other = next(pid for pid in pids if pid != watching_worker())
        streams = ("kubegate_open_streams", (("connection", "sandbox"),))

        def open_streams_seen_by_other() -> float:
            conn = connection_to(workers, other, pids)
            try:
                return scrape(conn).get(streams, 0.0)
            finally:
                conn.close()

        wait_for(lambda: open_streams_seen_by_other() == 1, what="the other worker to count the watch")
    finally:
        watch.kill()
        watch.wait()
    wait_for(lambda: open_streams_seen_by_other() == 0, what="the closed watch to leave the gauge")


def test_a_request_held_on_one_worker_is_released_by_an_approval_through_the_other(workers, sandbox):
    pids = worker_pids(workers)
    name = f"workers-test-{int(time.time() * 1000)}"
    run_kubectl(
        sandbox.kubeconfig, "create", "configmap", name, "-n", "prod", "--from-literal=a=b", check=True
    )
    holding, approving = pids
    held = connection_to(workers, holding, pids)
    outcome: dict[str, object] = {}

    def delete() -> None:
        outcome["answer"] = call(
            held, "DELETE", f"/k8s/sandbox/api/v1/namespaces/prod/configmaps/{name}", ALICE
        )
        outcome["at"] = time.monotonic()

    waiter = threading.Thread(target=delete, daemon=True)
    waiter.start()
    reviewer = connection_to(workers, approving, pids)
    found = None
    deadline = time.monotonic() + 20
    while found is None and time.monotonic() < deadline:
        status, body = call(reviewer, "GET", "/api/approvals", BOB)
        assert status == 200, body
        found = next((i["id"] for i in json.loads(body)["items"] if i["name"] == name), None)
        time.sleep(0.2)
    assert found is not None and "answer" not in outcome
    # The reviewer's connection is still the other worker's; the held one is still the first's.
    assert reviewer.sock is not None and held.sock is not None
    assert holder(workers, reviewer.sock.getsockname()[1], pids) == approving
    assert holder(workers, held.sock.getsockname()[1], pids) == holding
    approved_at = time.monotonic()
    status, body = call(reviewer, "POST", f"/api/approvals/{found}/approve", BOB, b"{}")
    assert status == 200, body
    waiter.join(30)
    status, body = outcome["answer"]  # type: ignore[misc]
    assert status == 200, body
    # Released by the holding worker's database poll (0.5 s), not by an in-process wake-up.
    assert float(outcome["at"]) - approved_at < 5  # type: ignore[arg-type]
    gone = run_kubectl(sandbox.kubeconfig, "get", "configmap", name, "-n", "prod")
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_sighup_reloads_every_worker(workers):
    pids = worker_pids(workers)
    dave = "dave-token-0123456789abcdef"
    ci_bot = GATEWAY_USERS["ci-bot"][1]
    for pid in pids:
        assert answers(workers, pid, pids, dave) == 401
        assert answers(workers, pid, pids, ci_bot) == 200
    add_token(workers, "dave", dave, drop="ci-bot")
    os.kill(workers.process.pid, signal.SIGHUP)
    for pid in pids:
        wait_for(lambda pid=pid: answers(workers, pid, pids, dave) == 200, what=f"worker {pid} to reload")
        # A token the new configuration dropped is refused by every worker, not only by some.
        assert answers(workers, pid, pids, ci_bot) == 401
    assert worker_pids(workers) == pids  # reloaded in place, not restarted


def test_a_killed_worker_is_restarted_with_the_configuration_in_force(workers):
    pids = worker_pids(workers)
    erin = "erin-token-0123456789abcdef"
    add_token(workers, "erin", erin)
    os.kill(workers.process.pid, signal.SIGHUP)
    for pid in pids:
        wait_for(lambda pid=pid: answers(workers, pid, pids, erin) == 200, what=f"worker {pid} to reload")
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(workers, timeout=5) and len(worker_pids(workers)) == 2,
             what="a new worker", timeout=30)  # fmt: skip
    renewed = worker_pids(workers)
    assert survivor in renewed
    newcomer = next(pid for pid in renewed if pid != survivor)
    wait_for(lambda: "serving" in workers.log.read_text().split(f"(pid {newcomer})")[-1][:20],
             what="the new worker to serve", timeout=30)  # fmt: skip
    assert f"(pid {victim}) was killed by SIGKILL; starting it again" in workers.log.read_text()
    # Forked from the supervisor's configuration as reloaded, not the one it started with.
    assert answers(workers, newcomer, renewed, erin) == 200
    assert answers(workers, newcomer, renewed, ALICE) == 200


def test_audit_chain_verifies_after_concurrent_load_on_both_workers(workers):
    pids = worker_pids(workers)
    alice = workers.kubeconfig("alice")
    for _ in range(5):
        kubectl_many(alice, 16, "get", "configmaps", "-n", "default")
        time.sleep(1.5)  # each worker publishes its sinks' gauges every second
        written = per_worker(workers, "gauge_sum", "kubegate_audit_written_events")
        if all(written.get(pid, 0) > 0 for pid in pids):
            break
    assert all(written.get(pid, 0) > 0 for pid in pids), written  # both wrote into the one chain
    verified = subprocess.run([str(VENV_BIN / "kubegate"), "audit", "verify", "--config", str(workers.config)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_sigterm_stops_every_worker_gracefully(sandbox, tmp_path):
    config = gateway_config(sandbox, tmp_path, free_port())
    config.update(workers=2, shutdown_grace_seconds=3)
    gateway = start_workers(tmp_path, config)
    pids = worker_pids(gateway)
    workers_dir = metrics_dir(gateway)
    watch = subprocess.Popen([KUBECTL, "get", "configmaps", "-n", "default", "-w"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "KUBECONFIG": str(gateway.kubeconfig())})  # fmt: skip
    try:
        time.sleep(1)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(30) == 0, gateway.log.read_text()
        took = time.monotonic() - started
    finally:
        watch.kill()
        watch.wait()
    assert took < 3 + 15, took
    assert not [pid for pid in pids if psutil.pid_exists(pid)]  # no orphans
    assert not workers_dir.exists()
    log = gateway.log.read_text()
    assert "all workers stopped" in log and "killing" not in log


def test_workers_stop_when_the_supervisor_is_killed(sandbox, tmp_path):
    config = gateway_config(sandbox, tmp_path, free_port())
    config.update(workers=2, shutdown_grace_seconds=1)
    gateway = start_workers(tmp_path, config)
    children = [psutil.Process(pid) for pid in worker_pids(gateway)]
    gateway.process.kill()
    gateway.process.wait(10)
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.pid for p in alive]


def test_one_line_refusals(sandbox, tmp_path):
    def serve(config: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "kubegate.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([str(VENV_BIN / "kubegate"), "serve", "--config", str(path)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    base = gateway_config(sandbox, tmp_path, free_port())
    base["workers"] = 2
    agent = {**base, "connections": {**base["connections"], "edge": {"type": "agent", "upstream": {}}}}
    refused = serve(agent)
    assert refused.returncode != 0
    assert (
        refused.stderr.strip().splitlines()[-1].endswith("workers: agent connections need workers: 1 for now")
    )

    audit_file = json.loads(json.dumps(base))
    audit_file["connections"]["sandbox"]["plugins"]["audit-file"] = {}
    refused = serve(audit_file)
    assert refused.returncode != 0 and "audit-file needs workers: 1 for now" in refused.stderr

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = {**base, "listen": f"127.0.0.1:{taken.getsockname()[1]}"}
    try:
        refused = serve(busy)
    finally:
        taken.close()
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("kubegate: error: cannot serve on 127.0.0.1:")

    for bad in (0, -1, True, "two", 1025):
        refused = serve({**base, "workers": bad})
        assert (
            refused.returncode != 0
            and ": workers: must be an integer from 1 to 1024, or auto" in refused.stderr
        )


def test_hypercorn_workers_serve_the_one_listener_too(sandbox, tmp_path):
    config = gateway_config(sandbox, tmp_path, free_port())
    config.update(workers=2, server="hypercorn", shutdown_grace_seconds=2)
    gateway = start_workers(tmp_path, config)
    try:
        pids = worker_pids(gateway)
        for pid in pids:
            assert answers(gateway, pid, pids, ALICE) == 200
        kubectl_many(gateway.kubeconfig("alice"), 8, "get", "configmaps", "-n", "default")
    finally:
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(30) == 0, gateway.log.read_text()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
