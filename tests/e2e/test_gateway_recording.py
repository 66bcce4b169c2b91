"""Session recording end to end: real kubectl runs exec (on a pty and without), port-forward, through a
connection with masking and recording; the recordings are then read back the ways people will — `kubegate
sessions list`, `kubegate replay`, the JSON API — and checked against what the client saw."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GATEWAY_USERS, VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import Background, PtySession, run_kubectl

from kubegate.plugins.recording.cast import parse_cast, play
from kubegate.sandbox.seed import API_TOKEN, DB_PASSWORD

KUBEGATE = str(VENV_BIN / "kubegate")
MARKER = "<masked by kubegate>"
CLEAR = [DB_PASSWORD, base64.b64encode(DB_PASSWORD.encode()).decode(), API_TOKEN]
ADA = ("ada-token-0123456789abcdef", ["auditors"])  # a reader: sees everyone's sessions


class TranscriptPty(PtySession):
    """A PtySession that also keeps every byte the terminal got (`expect` consumes its `output`)."""

    transcript = b""

    @property  # type: ignore[override]
    def output(self) -> bytes:
        return self._output

    @output.setter
    def output(self, value: bytes) -> None:
        old = getattr(self, "_output", b"")
        if len(value) > len(old) and value.startswith(old):
            self.transcript += value[len(old) :]
        self._output = value


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-recording")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    tokens = plain["plugins"]["static-tokens"]
    tokens["tokens"].append(
        {"user": "ada", "groups": ADA[1], "sha256": hashlib.sha256(ADA[0].encode()).hexdigest()}
    )
    config["plugins"] = {"recording": {"readers": ["auditors"], "directory": "recordings"}}
    config["connections"]["rec"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {"static-tokens": tokens, "masking": {"exec_hold_ms": 1000}, "recording": {}},
    }  # fmt: skip
    gateway = start_gateway(directory, config)
    time.sleep(1)  # the masking plugin's known-values follower lists the Secrets at start
    yield gateway
    stop_process(gateway.process)


def kubegate(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KUBEGATE, *args, "--config", str(gw.config)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def sessions(gw: Gateway, *args: str) -> list[dict[str, Any]]:
    proc = kubegate(gw, "sessions", "list", "-o", "json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_session(gw: Gateway, since: float, ended: bool = True, **match: Any) -> dict[str, Any]:
    """The newest session started after `since` whose fields equal `match` (waits for it to end)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for item in sessions(gw):
            if item["started"] >= since and all(item.get(k) == v for k, v in match.items()):
                if item["ended"] is not None or not ended:
                    return item
        time.sleep(0.2)
    raise AssertionError(f"no session like {match}: {sessions(gw)}")


def export(gw: Gateway, session_id: str, tmp_path: Path) -> str:
    target = tmp_path / f"{session_id}.cast"
    proc = kubegate(gw, "replay", session_id, "--export", str(target))
    assert proc.returncode == 0, proc.stderr
    return target.read_text()


def api(gw: Gateway, path: str, token: str | None) -> tuple[int, str, bytes]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{gw.url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def stored_bytes(gw: Gateway) -> bytes:
    """Everything the gateway stored: the database files and every recording."""
    files = [*(gw.dir / "state").glob("kubegate.db*"), *(gw.dir / "recordings").glob("*")]
    assert files
    return b"".join(path.read_bytes() for path in files)


def without_noise(text: str) -> str:
    """Terminal text without escape sequences and carriage returns, for comparing what was shown."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)


@pytest.fixture(scope="module")
def interactive(gw, tmp_path_factory) -> dict[str, Any]:
    """One `kubectl exec -it … sh` through the recording connection, as a person would use it."""
    start = time.time() - 1
    pty = TranscriptPty(["kubectl", "exec", "-it", "web", "-n", "prod", "--", "sh"],
                        gw.kubeconfig("alice", "rec"), rows=30, cols=100)  # fmt: skip
    result: dict[str, Any] = {}
    try:
        pty.expect(r"# ", timeout=30)  # the shell's prompt: kubectl has the terminal in raw mode by now
        pty.send("echo the value is $DB_PASSWORD\n")
        printed = pty.expect(r"\nthe value is ([^$\r\n][^\r\n]*)\r?\n", timeout=30)  # output, not echo
        result["printed"] = printed.group(1).decode()
        # Written to storage while the session still runs (flushed at least every second).
        running = wait_session(gw, start, ended=False, user="alice", command=["sh"])
        deadline, live = time.monotonic() + 5, ""
        while MARKER not in live and time.monotonic() < deadline:
            live = export(gw, running["id"], tmp_path_factory.mktemp("live"))
            time.sleep(0.2)
        result["live"] = live
        pty.send(f"echo typed {DB_PASSWORD} >/dev/null; echo done-typing\n")
        pty.expect(r"\ndone-typing\r?\n", timeout=30)
        pty.resize(40, 120)
        time.sleep(0.5)
        pty.send("exit 3\n")
        result["rc"] = pty.wait(30)
    finally:
        pty.close()
    result["transcript"] = pty.transcript.decode("utf-8", "replace")
    result["session"] = wait_session(gw, start, user="alice", command=["sh"])
    result["cast"] = export(gw, result["session"]["id"], tmp_path_factory.mktemp("cast"))
    return result


@pytest.mark.needs_pods
def test_interactive_exec_is_recorded_with_its_exit_status(interactive):
    assert interactive["printed"] == MARKER and interactive["rc"] == 3
    session = interactive["session"]
    assert session["exit_code"] == 3 and session["kind"] == "exec" and session["tty"] is True
    assert (session["namespace"], session["pod"], session["user"]) == ("prod", "web", "alice")
    assert session["groups"] == GATEWAY_USERS["alice"][0] and session["connection"] == "rec"
    assert (session["width"], session["height"]) == (100, 30)
    assert session["bytes_in"] > 0 and session["bytes_out"] > 0 and not session["incomplete"]
    assert session["ended"] >= session["started"] and session["recorded"]


@pytest.mark.needs_pods
def test_the_recording_is_asciicast_with_input_output_and_resizes(interactive):
    cast = parse_cast(interactive["cast"])
    assert cast.header["version"] == 2 and (cast.header["width"], cast.header["height"]) == (100, 30)
    codes = {code for _, code, _ in cast.events}
    assert codes == {"o", "i", "r"}
    typed = "".join(data for _, code, data in cast.events if code == "i")
    assert "echo the value is $DB_PASSWORD" in typed and "exit 3" in typed
    assert f"echo typed {MARKER} >/dev/null" in typed  # the typed secret, masked
    assert ("r", "120x40") in [(code, data) for _, code, data in cast.events]
    times = [t for t, _, _ in cast.events]
    assert times == sorted(times) and times[-1] > 0


@pytest.mark.needs_pods
def test_the_recording_was_stored_while_the_session_ran(interactive):
    assert f"the value is {MARKER}" in interactive["live"]  # before `exit 3` was typed
    assert "exit 3" not in interactive["live"]


@pytest.mark.needs_pods
def test_no_clear_secret_is_stored_anywhere(gw, interactive):
    assert f"the value is {MARKER}" in interactive["cast"]
    stored = stored_bytes(gw)
    for value in CLEAR:
        assert value not in interactive["cast"]
        assert value.encode() not in stored
    assert DB_PASSWORD not in interactive["transcript"]  # the control: the client never saw it either


@pytest.mark.needs_pods
def test_replay_shows_what_the_client_saw(interactive):
    out = io.StringIO()
    slept: list[float] = []
    play(interactive["cast"], out, speed=1, max_wait=2, sleep=slept.append)
    replayed = without_noise(out.getvalue())
    shown = without_noise(interactive["transcript"])
    # kubectl adds nothing to a tty session's output but its own exit message after the session.
    assert replayed and shown.startswith(replayed), (replayed[-300:], shown[-300:])
    assert shown[len(replayed) :].strip() in ("", "command terminated with exit code 3")
    assert slept and all(0 <= s <= 2 for s in slept)


@pytest.mark.needs_pods
def test_sessions_list_and_replay_commands(gw, interactive, tmp_path):
    session_id = interactive["session"]["id"]
    table = kubegate(gw, "sessions", "list", "--user", "alice", "--since", "1h")
    assert table.returncode == 0
    line = next(line for line in table.stdout.splitlines() if line.startswith(session_id))
    assert "alice" in line and "prod/web" in line and " 3 " in line and line.rstrip().endswith("sh")
    assert session_id not in kubegate(gw, "sessions", "list", "--user", "bob").stdout

    replay = subprocess.run([KUBEGATE, "replay", session_id, "--speed", "1000", "--config", str(gw.config)],
                            capture_output=True, timeout=60)  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.decode() == parse_cast(interactive["cast"]).output()  # byte for byte, \r included
    stderr = replay.stderr.decode()
    assert "alice" in stderr and "exit status 3" in stderr and "prod/web" in stderr

    target = tmp_path / "x.cast"
    exported = kubegate(gw, "replay", session_id, "--speed", "1000", "--export", str(target))
    assert exported.returncode == 0 and target.read_text() == interactive["cast"]

    missing = kubegate(gw, "replay", "s-000000000000")
    assert missing.returncode == 2 and missing.stderr.startswith("kubegate: error: no session")


@pytest.mark.needs_pods
def test_non_tty_exec_is_recorded_too(gw, tmp_path):
    start = time.time() - 1
    script = "echo hello-recording; echo to-stderr >&2; echo pw=$DB_PASSWORD; exit 0"
    proc = run_kubectl(gw.kubeconfig("alice", "rec"), "exec", "web", "-n", "prod", "--", "sh", "-c", script)
    assert proc.returncode == 0 and "hello-recording" in proc.stdout and MARKER in proc.stdout
    session = wait_session(gw, start, command=["sh", "-c", script])
    assert session["exit_code"] == 0 and session["tty"] is False
    cast = parse_cast(export(gw, session["id"], tmp_path))
    assert (cast.header["width"], cast.header["height"]) == (80, 24)
    output = cast.output()
    assert "hello-recording\n" in output and "to-stderr\n" in output and f"pw={MARKER}" in output
    assert DB_PASSWORD not in output


@pytest.mark.needs_pods
def test_a_failing_command_has_its_exit_code(gw):
    start = time.time() - 1
    proc = run_kubectl(gw.kubeconfig("alice", "rec"), "exec", "web", "-n", "prod", "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7
    assert wait_session(gw, start, command=["sh", "-c", "exit 7"])["exit_code"] == 7


def test_port_forward_is_recorded_as_metadata_only(gw):
    start = time.time() - 1
    forward = Background(
        ["kubectl", "port-forward", "pod/web", "-n", "prod", ":8080"], gw.kubeconfig("alice", "rec")
    )
    try:
        port = int(forward.read_until(r"Forwarding from 127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = conn.recv(4096)
        assert b"hello from" in answer
    finally:
        forward.stop()
    session = wait_session(gw, start, kind="portforward")
    assert session["user"] == "alice" and session["pod"] == "web" and session["recorded"] is False
    assert session["bytes_in"] > 0 and session["bytes_out"] > 0 and session["exit_code"] is None
    assert kubegate(gw, "replay", session["id"]).returncode == 2  # nothing to play


@pytest.mark.needs_pods
def test_the_api_shows_sessions_to_their_owner_and_readers_only(gw, interactive):
    session_id = interactive["session"]["id"]
    alice, bob, ada = GATEWAY_USERS["alice"][1], GATEWAY_USERS["bob"][1], ADA[0]

    status, _, body = api(gw, "/api/sessions?user=alice&since=1h", alice)
    assert status == 200 and session_id in {item["id"] for item in json.loads(body)["items"]}
    status, _, body = api(gw, "/api/sessions", bob)
    assert status == 200 and all(item["user"] == "bob" for item in json.loads(body)["items"])
    status, _, body = api(gw, "/api/sessions", ada)
    assert status == 200 and session_id in {item["id"] for item in json.loads(body)["items"]}

    status, _, body = api(gw, f"/api/sessions/{session_id}", alice)
    detail = json.loads(body)
    assert status == 200 and detail["exit_code"] == 3 and "location" not in detail
    status, media, body = api(gw, f"/api/sessions/{session_id}/cast", alice)
    assert status == 200 and media.startswith("application/x-asciicast")
    assert body.decode() == interactive["cast"]
    assert api(gw, f"/api/sessions/{session_id}/cast", ada)[0] == 200

    for path in (f"/api/sessions/{session_id}", f"/api/sessions/{session_id}/cast"):
        status, media, body = api(gw, path, bob)
        assert status in (403, 404) and media.startswith("application/json") and "error" in json.loads(body)
        assert interactive["cast"] not in body.decode()
        assert api(gw, path, None)[0] == 401
    assert api(gw, "/api/sessions/s-000000000000", alice)[0] == 404
    assert api(gw, "/api/sessions?since=yesterday", alice)[0] == 400


@pytest.mark.needs_pods
def test_a_secret_key_pasted_into_exec_it_is_not_stored_in_clear(gw, tmp_path):
    # A terminal sends a paste's newlines as CR: the recording's typed input kept a multi-line Secret value
    # (a private key) in clear, line by line, while its echo (CR LF) was masked (red team, 2026-12-08).
    lines = [f"kubegate-paste-{os.getpid()}-line-{i}-{'Q' * 40}" for i in range(4)]
    name = f"paste-value-{os.getpid()}"
    plain = gw.kubeconfig("alice", "sandbox")
    run_kubectl(plain, "create", "secret", "generic", name, "-n", "dev", "--from-literal=key=" + "\n".join(lines),
                check=True)  # fmt: skip
    try:
        script = "printf '" + "\\n".join(lines) + "\\n'"
        for _ in range(50):  # the follower learns the value from its watch
            control = run_kubectl(gw.kubeconfig("alice", "rec"), "exec", "web", "-n", "prod", "--", "sh", "-c",
                                  script).stdout  # fmt: skip
            if MARKER in control:
                break
            time.sleep(0.2)
        assert control == f"{MARKER}\n"
        start = time.time() - 1
        pty = TranscriptPty(["kubectl", "exec", "-it", "web", "-n", "prod", "--", "sh"],
                            gw.kubeconfig("alice", "rec"))  # fmt: skip
        try:
            pty.expect(r"# ", timeout=30)  # raw mode: what is sent reaches kubectl as a terminal's bytes
            pty.send("cat >/dev/null\r")
            pty.send("\r".join(lines) + "\r")  # the paste
            pty.send("\x04")
            pty.expect(r"# ", timeout=30)
            pty.send("exit\r")
            pty.wait(30)
        finally:
            pty.close()
        session = wait_session(gw, start, user="alice", command=["sh"])
        cast = export(gw, session["id"], tmp_path)
        typed = "".join(data for _, code, data in parse_cast(cast).events if code == "i")
        assert f"cat >/dev/null\r{MARKER}\r\x04" in typed
        assert not any(line in cast for line in lines)
        assert not any(line.encode() in stored_bytes(gw) for line in lines)
    finally:
        run_kubectl(plain, "delete", "secret", name, "-n", "dev")
