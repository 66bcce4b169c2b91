"""The gateway's own credential to the API server: token file (re-read when rotated), client certificate,
kubeconfig + context — and `kubegate kubeconfig` / `kubegate demo` as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from browserless import browser_login, read_login_prompt
from conftest import GATEWAY_USERS, PLUGIN_FIXTURE, VENV_BIN, free_port
from kubetest import run_kubectl, wait_for

KUBECTL = str(VENV_BIN / "kubectl")
KUBEGATE = str(Path(sys.executable).parent / "kubegate")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("connection", ["by-cert", "by-kubeconfig"])
def test_each_credential_kind_carries_the_callers_identity(gateway, sandbox, connection):
    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    proc = run_kubectl(
        gateway.kubeconfig("alice", connection=connection), "auth", "whoami", "-o", "json", check=True
    )
    assert json.loads(proc.stdout)["status"]["userInfo"]["username"] == "alice"
    records = sandbox.requests_log(since)
    assert records and all(r["impersonate_user"] == "alice" for r in records)
    expected = "kubegate-gateway" if connection == "by-cert" else "kubegate-admin"
    assert all(r["authenticated_as"] == expected for r in records)


def test_rotated_token_file_is_picked_up(gateway, sandbox):
    kubeconfig = gateway.kubeconfig("alice", connection="rotating")
    token_file = gateway.dir / "rotating-token"
    run_kubectl(kubeconfig, "get", "pods", "-n", "prod", check=True)
    try:
        token_file.write_text("revoked-token\n")
        # The file is checked at most once a second; then the API server refuses the token it now holds.
        wait_for(lambda: "Unauthorized" in run_kubectl(kubeconfig, "get", "pods", "-n", "prod").stderr,
                 "the gateway to send the rewritten (revoked) token", timeout=15)  # fmt: skip
    finally:
        token_file.write_text(sandbox.token)
    wait_for(lambda: run_kubectl(kubeconfig, "get", "pods", "-n", "prod").returncode == 0,
             "the gateway to send the restored token", timeout=15)  # fmt: skip


def test_kubegate_kubeconfig_output_works_with_kubectl(gateway, tmp_path):
    proc = subprocess.run(
        [KUBEGATE, "kubeconfig", "--config", str(gateway.config), "--connection", "sandbox", "--user", "ci-bot",
         "--token", GATEWAY_USERS["ci-bot"][1]],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(PLUGIN_FIXTURE)},  # the config enables the test plugin
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(proc.stdout)
    whoami = run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", check=True)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == "ci-bot"


def start_demo(tmp_path, **popen) -> tuple[subprocess.Popen, str, int]:
    """`kubegate demo` in `tmp_path` (relative --dir, as `make demo` runs it) and what it printed up to
    "Press Ctrl-C"."""
    port = free_port()
    proc = subprocess.Popen([KUBEGATE, "demo", "--dir", "demo", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip
    assert proc.stdout is not None
    output = ""
    deadline = time.monotonic() + 60
    while "Press Ctrl-C" not in output and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output += line
    return proc, output, port


def test_ctrl_c_in_a_terminal_stops_the_demo_without_an_error(tmp_path):
    """A terminal sends SIGINT to the whole foreground process group: the demo's identity provider gets it
    too and may be gone before the demo stops it. That used to end in "cannot start the demo" and exit 1."""
    proc, output, _port = start_demo(tmp_path, start_new_session=True)
    assert "Press Ctrl-C" in output, output
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "error" not in rest, rest


@pytest.mark.needs_pods
def test_demo_starts_serves_kubectl_and_stops_cleanly(tmp_path):
    proc, output, port = start_demo(tmp_path)
    try:
        assert "kubegate demo is running" in output, output
        kubeconfig = tmp_path / "demo" / "kubeconfig"
        whoami = run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", check=True)
        assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == "alice"
        ci = run_kubectl(kubeconfig, "--context", "ci-bot@demo", "get", "pods", "-n", "prod", check=True)
        # Every way of looking at the seeded secret shows it masked.
        for args in (["get", "secret", "db-credentials", "-n", "prod", "-o", "yaml"],
                     ["describe", "secret", "db-credentials", "-n", "prod"],
                     ["logs", "web", "-n", "prod", "--tail=2"]):  # fmt: skip
            looked = run_kubectl(kubeconfig, *args)
            assert "hunter2-prod-s3cret" not in looked.stdout + looked.stderr
            assert "aHVudGVyMi1wcm9kLXMzY3JldA" not in looked.stdout

        assert "web" in ci.stdout
        assert oct(kubeconfig.stat().st_mode & 0o777) == "0o600"  # it holds tokens
        # The policy of the demo: a guardrail for the bot, a held delete for the developer, approved by rita
        # with the command the demo printed.
        bot = run_kubectl(kubeconfig, "--context", "ci-bot@demo", "delete", "pod", "web", "-n", "prod")
        assert bot.returncode == 1 and "CI may not delete anything in prod; ask a human" in bot.stderr
        held = subprocess.Popen([KUBECTL, "delete", "pod", "web-0", "-n", "prod"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": str(kubeconfig)})  # fmt: skip
        listing = re.search(r"(\S+/kubegate approvals list .*)", output).group(1)
        deadline, found = time.monotonic() + 20, None
        while found is None and time.monotonic() < deadline:
            listed = subprocess.run(shlex.split(listing), capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0, listed.stderr
            found = next((line.split()[0] for line in listed.stdout.splitlines() if "web-0" in line), None)
            time.sleep(0.2)
        assert found is not None and held.poll() is None
        approve = (
            re.search(r"(\S+/kubegate approvals approve ID .*)", output)
            .group(1)
            .replace(" ID ", f" {found} ")
        )
        assert (
            subprocess.run(shlex.split(approve), capture_output=True, text=True, timeout=30).returncode == 0
        )
        out, err = held.communicate(timeout=30)
        assert held.returncode == 0 and 'pod "web-0" deleted' in out, err
        # A shell in prod needs rita too (a one-hour window); what it prints is masked.
        shell = subprocess.Popen([KUBECTL, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo $DB_PASSWORD"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "KUBECONFIG": str(kubeconfig)})  # fmt: skip
        deadline, found = time.monotonic() + 20, None
        while found is None and time.monotonic() < deadline:
            listed = subprocess.run(shlex.split(listing), capture_output=True, text=True, timeout=30)
            found = next(
                (line.split()[0] for line in listed.stdout.splitlines() if "pods/exec" in line), None
            )
            time.sleep(0.2)
        assert found is not None
        approve_exec = approve.replace(approve.split()[3], found)
        assert (
            subprocess.run(shlex.split(approve_exec), capture_output=True, text=True, timeout=30).returncode
            == 0
        )
        out, err = shell.communicate(timeout=30)
        assert shell.returncode == 0 and out.strip() == "<masked by kubegate>", err

        # What happened, with the commands the demo printed: per kubectl command, the session replayed, the
        # chain intact.
        def printed(prefix: str) -> list[str]:
            line = re.search(rf"(\S+/kubegate {prefix}.*?)(?:\s+#|$)", output, re.M).group(1)
            return shlex.split(line)

        time.sleep(1)  # events are written just after each response
        commands = subprocess.run(printed("audit commands"), capture_output=True, text=True, timeout=30)
        assert "ci-bot ran `kubectl delete` on demo → 1 call, 1 denied" in commands.stdout, commands.stdout
        # alice's delete: the DELETE (held, approved by rita), then kubectl's check that the pod is gone (a
        # 404 it waits for: the delete's success, not a failure)
        alice = next(line for line in commands.stdout.splitlines() if "alice ran `kubectl delete`" in line)
        assert alice.endswith("alice ran `kubectl delete` on demo → 2 calls, approved by rita"), (
            commands.stdout
        )
        # The printed `policy check` examples answer as the gateway decided above: alice's delete held for a
        # reviewer, ci-bot's refused by its guardrail (its groups come from its static token).
        checks = {
            line.split(" --as ")[1].split()[0]: shlex.split(line)
            for line in re.findall(r"(\S+/kubegate policy check .*)$", output, re.M)
        }
        assert set(checks) == {"alice", "ci-bot"}, output
        decided = {user: subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
                   for user, command in checks.items()}  # fmt: skip
        assert "decision: approve by rule deletes-in-prod" in decided["alice"], decided["alice"]
        assert (
            "decision: deny by rule bots-never-delete-in-prod: CI may not delete anything in prod"
            in decided["ci-bot"]
        )
        sessions = subprocess.run(printed("sessions list"), capture_output=True, text=True, timeout=30)
        session_id = next(line.split()[0] for line in sessions.stdout.splitlines() if "DB_PASSWORD" in line)
        replay = [part if part != "SESSION_ID" else session_id for part in printed("replay SESSION_ID")]
        played = subprocess.run([*replay, "--speed", "100"], capture_output=True, text=True, timeout=30)
        assert played.returncode == 0 and played.stdout.strip() == "<masked by kubegate>", played.stderr
        verify = subprocess.run(printed("audit verify"), capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0 and verify.stdout.startswith("intact:"), verify.stdout
        # The printed `kubegate login` command, run as shown (headless), against the demo's identity provider.
        command = re.search(
            r"(\S+/kubegate login .*?--kubeconfig \S+)", output.replace("\\\n", " "), re.S
        ).group(1)
        login = subprocess.Popen(
            [*shlex.split(command), "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path / "cache")},
        )  # fmt: skip
        url, code = read_login_prompt(login.stderr)
        demo_dir = tmp_path / "demo"
        idp_url = yaml.safe_load((demo_dir / "kubegate.yaml").read_text())["plugins"]["login"]["providers"][
            0
        ]["issuer"]
        ca_file = demo_dir / "state" / "tls" / "ca.crt"
        page = browser_login(f"https://127.0.0.1:{port}", ca_file, "demo-idp", idp_url, url, code, "rita")
        assert "demo:rita" in page
        assert login.wait(30) == 0, login.stderr.read()
        whoami = run_kubectl(demo_dir / "kubeconfig-login", "auth", "whoami", "-o", "json", check=True,
                             env={"KUBEGATE_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
        info = json.loads(whoami.stdout)["status"]["userInfo"]
        assert info["username"] == "demo:rita" and "demo:reviewers" in info["groups"]
        # After `kubegate login`, rita reviews with no flags: the gateway, connection and CA are remembered.
        reviewed = subprocess.run([KUBEGATE, "approvals", "list", "--state", "all"], capture_output=True, text=True,
                                  timeout=30, env={**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
        assert reviewed.returncode == 0, reviewed.stderr
        assert any("web-0" in line and "used" in line.split() for line in reviewed.stdout.splitlines()), (
            reviewed.stdout
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert [pid for pid in leftovers if int(pid) != os.getpid()] == []  # no pod processes left behind
