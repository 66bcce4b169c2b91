"""The web UI in a real browser (Debian's Chromium driven by Playwright) against `kubegate demo`: a reviewer
logs in at the demo's identity provider, approves a held `kubectl delete` and kubectl finishes; a denial's
comment reaches kubectl; an auditor cannot approve; a request without the CSRF token is refused; a recorded
session replays in the player. Screenshots go to test-artifacts/ (linked from docs/ui.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from kubetest import KUBECTL, KUBEGATE, run_kubectl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


@dataclass
class Demo:
    dir: Path
    ui_url: str
    kubeconfig: Path
    output: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    directory = tmp_path_factory.mktemp("ui-demo")
    port = free_port()
    proc = subprocess.Popen([KUBEGATE, "demo", "--dir", str(directory / "demo"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = ""
    deadline = time.monotonic() + 90
    while "Press Ctrl-C" not in output and time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        output += line
    assert "kubegate demo is running" in output, output
    ui_url = re.search(r"web UI:\s+(\S+)", output).group(1)
    yield Demo(directory / "demo", ui_url, directory / "demo" / "kubeconfig", output)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def log_in(browser, demo: Demo, who: str):
    """A new browser context (its own cookies) logged in as `who` at the demo's identity provider."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(demo.ui_url)
    assert "/ui/login" in page.url  # not logged in yet
    page.get_by_role("link", name=re.compile("Log in with")).click()
    page.locator("input[name=sub]").fill(who)  # oidc-provider-mock's form: the subject to log in as
    page.locator("button[type=submit], input[type=submit]").first.click()
    page.wait_for_url(re.compile(r"/ui/$"), timeout=20_000)
    return page


def kubectl_held(demo: Demo, *args: str) -> subprocess.Popen:
    return subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KUBECONFIG": str(demo.kubeconfig)})  # fmt: skip


def open_request(page, text: str):
    """From the inbox (which updates by itself), open the pending request whose row mentions `text`."""
    row = page.locator("tr", has_text=text)
    row.first.wait_for(timeout=20_000)
    row.first.get_by_role("link").click()
    page.wait_for_url(re.compile(r"/ui/approvals/"))


def csrf_less_post(page, path: str) -> int:
    return page.evaluate(
        """async (path) => (await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify({comment: "no csrf"})})).status""",
        path,
    )


def test_reviewer_approves_a_held_delete_in_the_browser(demo, browser):
    held = kubectl_held(demo, "delete", "pod", "web-0", "-n", "prod")
    page = log_in(browser, demo, "rita")
    open_request(page, "web-0")
    dialog = page.locator(".dialog")
    for text in ["alice", "person", "static-tokens", "delete pods web-0 in prod", "kubectl delete",
                 "connection demo", "deleting in prod needs a reviewer", "deletes-in-prod"]:  # fmt: skip
        assert text in dialog.inner_text(), text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-approval-dialog.png"), full_page=True)
    assert held.poll() is None  # still waiting

    # Without the page's CSRF token the session cookie is not enough.
    approval_id = page.url.rsplit("/", 1)[1]
    assert csrf_less_post(page, f"/api/approvals/{approval_id}/approve") in (401, 403)
    assert held.poll() is None

    page.get_by_role("button", name="Approve").click()
    page.get_by_role("status").filter(has_text="approved by demo:rita").wait_for(timeout=20_000)
    out, err = held.communicate(timeout=30)
    assert held.returncode == 0 and 'pod "web-0" deleted' in out, err
    page.get_by_role("status").filter(has_text="went through").wait_for(timeout=20_000)
    gone = run_kubectl(demo.kubeconfig, "get", "pod", "web-0", "-n", "prod")
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_a_denial_comment_reaches_kubectl(demo, browser):
    held = kubectl_held(demo, "delete", "pod", "worker", "-n", "prod")
    page = log_in(browser, demo, "rita")
    open_request(page, "worker")
    page.get_by_label(re.compile("Comment")).fill("not during the release freeze")
    page.get_by_role("button", name="Deny").click()
    page.get_by_role("status").filter(has_text="denied").wait_for(timeout=20_000)
    _, err = held.communicate(timeout=30)
    assert held.returncode != 0 and "not during the release freeze" in err


def test_an_auditor_sees_but_cannot_approve(demo, browser):
    held = kubectl_held(demo, "delete", "pod", "web", "-n", "prod")
    try:
        reviewer = log_in(browser, demo, "rita")
        open_request(reviewer, "pods web in prod")
        approval_id = reviewer.url.rsplit("/", 1)[1]
        auditor = log_in(browser, demo, "ava")
        auditor.goto(f"{demo.ui_url}approvals/{approval_id}")
        auditor.locator(".dialog").wait_for()
        assert auditor.get_by_role("button", name="Approve").count() == 0
        # Even with the CSRF token, the API refuses a non-reviewer.
        token = auditor.locator('meta[name="csrf-token"]').get_attribute("content")
        status = auditor.evaluate(
            """async ([path, token]) => (await fetch(path, {method: "POST", body: "{}",
                 headers: {"Content-Type": "application/json", "X-CSRF-Token": token}})).status""",
            [f"/api/approvals/{approval_id}/approve", token],
        )
        assert status == 403
        auditor.goto(f"{demo.ui_url}audit")
        auditor.locator(".chain").filter(has_text="Hash chain intact").wait_for(timeout=20_000)
        assert held.poll() is None
    finally:
        held.kill()


@pytest.mark.needs_pods
def test_a_recorded_session_replays_in_the_browser(demo, browser):
    page = log_in(browser, demo, "rita")
    shell = kubectl_held(
        demo, "exec", "web", "-n", "prod", "--", "sh", "-c", "echo replayed-in-the-browser-$((6*7))"
    )
    open_request(page, "pods/exec")  # a shell in prod needs a reviewer too
    page.get_by_role("button", name="Approve").click()
    out, err = shell.communicate(timeout=30)
    assert shell.returncode == 0 and "replayed-in-the-browser-42" in out, err
    page.goto(f"{demo.ui_url}sessions")
    page.locator("tr", has_text="replayed-in-the-browser").get_by_role("link").first.click()
    page.locator(".player").filter(has_text="replayed-in-the-browser-42").wait_for(timeout=20_000)
    assert page.locator(".timeline li").count() >= 1  # the session's API calls beside it
    page.screenshot(path=str(ARTIFACTS / "ui-session-replay.png"), full_page=True)
    page.goto(f"{demo.ui_url}connections")
    page.locator(".connection").filter(has_text="deletes-in-prod").wait_for()
    # Approving that shell opened a one-hour window for alice: rita can end it from the grants page.
    page.goto(f"{demo.ui_url}grants")
    grant = page.locator("tr", has_text="shell-into-prod").filter(has_text="active")
    grant.get_by_role("button", name="Revoke").click()
    page.locator("tr", has_text="shell-into-prod").filter(has_text="revoked").wait_for(timeout=20_000)


def test_own_requests_are_not_approvable_and_log_out_revokes_the_token(demo, browser):
    page = log_in(browser, demo, "rita")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "kubegate_session"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    token = cookie["value"]
    # rita's own gateway token (from this very login) asks for something that needs a reviewer
    own = kubectl_held(demo, "--token", token, "delete", "configmap", "app-config", "-n", "prod")
    try:
        row = page.locator("tr", has_text="app-config")
        row.first.wait_for(timeout=20_000)
        assert "your request" in row.first.inner_text()
        row.first.get_by_role("link").click()
        page.locator(".dialog").filter(has_text="This is your own request").wait_for()
        assert page.get_by_role("button", name="Approve").count() == 0
    finally:
        own.kill()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/ui/login"))
    after = run_kubectl(demo.kubeconfig, "--token", token, "get", "pods", "-n", "prod")
    assert after.returncode != 0 and "Unauthorized" in after.stderr  # the token itself was revoked


def test_the_connections_page_shows_an_agent_tunnel(sandbox, browser, tmp_path_factory):
    """A `type: agent` connection: the page says whether an agent is connected and lists its tunnel."""
    from conftest import GATEWAY_USERS, stop_process
    from e2e.agent_stack import start_agent_stack

    stack = start_agent_stack(sandbox, tmp_path_factory.mktemp("ui-agent"), plugins={"ui": {}})
    try:
        context = browser.new_context(
            ignore_https_errors=True,
            viewport={"width": 1280, "height": 900},
            extra_http_headers={"Authorization": f"Bearer {GATEWAY_USERS['alice'][1]}"},
        )
        page = context.new_page()
        page.goto(f"{stack.gateway.url}/ui/connections")
        section = page.locator(".connection").filter(has_text="edge")
        section.locator(".agent-up").filter(has_text="connected").wait_for(timeout=20_000)
        row = section.locator("tr", has_text="edge-1")
        assert "kubegate-agent_" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "ui-connections-agent.png"), full_page=True)
        # The agent goes: the page (reloaded) says so.
        stack.agent.stop(kill=True)
        deadline = time.monotonic() + 20
        while True:
            page.reload()
            state = page.locator(".connection").filter(has_text="edge").locator(".agent-down, .agent-up")
            state.first.wait_for(timeout=20_000)
            if "no agent connected" in state.first.inner_text():
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        context.close()
    finally:
        stack.agent.stop()
        stop_process(stack.gateway.process)


def test_the_dialog_quotes_the_requesters_stated_reason(demo, browser):
    """A caller's `Kubegate-Intent` (every MCP tool's `reason`) is shown to the reviewer, as text."""
    import json
    import ssl
    import threading
    import urllib.error
    import urllib.request

    import yaml

    kubeconfig = yaml.safe_load(demo.kubeconfig.read_text())
    context = next(c for c in kubeconfig["contexts"] if c["name"] == kubeconfig["current-context"])["context"]
    cluster = next(c for c in kubeconfig["clusters"] if c["name"] == context["cluster"])["cluster"]
    user = next(u for u in kubeconfig["users"] if u["name"] == context["user"])["user"]
    tls = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
    if "certificate-authority-data" in cluster:
        import base64

        tls = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
    reason = "rotating the config <b>after</b> incident 42"
    request = urllib.request.Request(
        f"{cluster['server']}/api/v1/namespaces/prod/configmaps/app-config", method="DELETE",
        headers={"Authorization": f"Bearer {user['token']}", "Kubegate-Intent": reason.replace(" ", "%20")},
    )  # fmt: skip
    answer: dict = {}

    def held_delete() -> None:
        try:
            with urllib.request.urlopen(request, context=tls, timeout=60) as response:
                answer["status"] = response.status
        except urllib.error.HTTPError as exc:
            answer["status"], answer["body"] = exc.code, json.loads(exc.read())

    thread = threading.Thread(target=held_delete)
    thread.start()
    page = log_in(browser, demo, "rita")
    open_request(page, "app-config")
    dialog = page.locator(".dialog")
    dialog.get_by_text("stated reason").wait_for(timeout=20_000)
    assert dialog.locator("q").inner_text() == reason  # as text: no <b> element made of it
    assert dialog.locator("q b").count() == 0
    page.get_by_role("button", name="Deny").click()
    page.get_by_role("status").filter(has_text="denied").wait_for(timeout=20_000)
    thread.join(30)
    assert answer.get("status") == 403, answer
