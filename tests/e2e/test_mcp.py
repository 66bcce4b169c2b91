"""The MCP endpoint end to end: the MCP SDK's own client over HTTPS against a `kubegate serve` process in
front of a sandbox of this module's own (tools delete pods), reviewers acting through the JSON API.

What is checked is what an agent can get away with: every tool call goes through the same authentication,
policy, approvals, masking and audit as kubectl, and nothing the agent sends can point a request elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from conftest import (
    VENV_BIN,
    Gateway,
    Sandbox,
    free_port,
    gateway_config,
    start_gateway,
    start_sandbox,
    stop_process,
    testing,
)
from kubetest import gateway_api, run_kubectl
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from kubegate.sandbox.seed import API_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD

KUBEGATE = str(VENV_BIN / "kubegate")
AGENT = ("agent-7", ["agents"], "agent-token-0123456789abcdef")
REVIEWER = ("rita", ["reviewers"], "rita-token-0123456789abcdef")
OUTSIDER = ("olga", ["agents"], "olga-token-0123456789abcdef")  # accepted by the `other` connection only
POLICY = {
    "default": "allow",
    "rules": [
        {"name": "agents-deletes-held", "match": {"groups": ["agents"], "verbs": ["delete"], "namespaces": ["prod"]},
         "action": "approve", "message": "agents' deletes in prod need a reviewer",
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 120}},
    ],
}  # fmt: skip


wait_for = testing.wait_for


def agents_requests(sandbox: Sandbox, since: int = 0) -> list[dict[str, Any]]:
    """What the cluster received as the agent (impersonated), after the entry with id `since`."""
    return [r for r in sandbox.requests_log(since) if r.get("impersonate_user") == AGENT[0]]


def last_entry(sandbox: Sandbox) -> int:
    log = sandbox.requests_log()
    return log[-1]["id"] if log else 0


def tokens(*people: tuple[str, list[str], str]) -> list[dict[str, Any]]:
    return [{"user": u, "groups": g, "sha256": hashlib.sha256(t.encode()).hexdigest()} for u, g, t in people]


@pytest.fixture(scope="module")
def own_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox-mcp"))
    yield sandbox
    stop_process(sandbox.process)


@pytest.fixture(scope="module")
def gw(own_sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-mcp")
    config = gateway_config(own_sandbox, directory, free_port())
    sandbox = config["connections"]["sandbox"]
    sandbox["plugins"]["static-tokens"]["tokens"] += tokens(AGENT, REVIEWER)
    sandbox["plugins"].update({
        "policy": POLICY, "approvals": {}, "masking": {}, "recording": {},
        "audit-file": {}, "audit-db": {}, "mcp": {"progress_seconds": 0.5},
    })  # fmt: skip
    config["plugins"] = {"audit-file": {"path": str(directory / "audit.jsonl")}}
    config["connections"]["other"] = {
        "upstream": sandbox["upstream"],
        "plugins": {"static-tokens": {"tokens": tokens(OUTSIDER)}, "mcp": {}},
    }
    config["connections"]["no-mcp"] = {"upstream": sandbox["upstream"], "plugins": {"static-tokens": {
        "tokens": tokens(AGENT)}}}  # fmt: skip
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


@asynccontextmanager
async def agent(gw: Gateway, token: str = AGENT[2], connection: str = "sandbox") -> AsyncIterator[Client]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(
        verify=context, headers=headers, timeout=httpx2.Timeout(30, read=300)
    ) as http:
        async with Client(streamable_http_client(f"{gw.url}/mcp/{connection}", http_client=http)) as client:
            yield client


def text(result: Any) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def audit(gw: Gateway) -> list[dict[str, Any]]:
    path = gw.dir / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["record"] for line in lines]


def tool_events(gw: Gateway, tool: str) -> list[dict[str, Any]]:
    return [e for e in audit(gw) if e["kind"] == "mcp_tool" and e["data"]["tool"] == tool]


def pending(gw: Gateway, **expect: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        status, answer = gateway_api(gw, "GET", "/api/approvals", REVIEWER[2])
        assert status == 200, answer
        return next((i for i in answer["items"] if all(i.get(k) == v for k, v in expect.items())), None)

    return wait_for(find, timeout=30, what=f"a pending approval like {expect}")


# -- reads ----------------------------------------------------------------------------------------------


async def test_tools_are_listed_and_every_one_requires_a_reason(gw):
    async with agent(gw) as client:
        listed = (await client.list_tools()).tools
    names = {tool.name for tool in listed}
    assert names == {"list_resources", "get_resource", "describe", "logs", "apply", "delete", "scale",
                     "rollout_restart", "exec"}  # fmt: skip
    for tool in listed:
        assert "reason" in tool.input_schema["required"], tool.name


@pytest.mark.needs_pods
async def test_list_get_describe_and_logs_work(gw):
    async with agent(gw) as client:
        listed = await client.call_tool("list_resources", {"resource": "pods", "namespace": "prod",
                                                           "reason": "find the web pods"})  # fmt: skip
        assert not listed.is_error, text(listed)
        assert {"web", "web-0", "worker"} <= {item["name"] for item in json.loads(text(listed))["items"]}

        got = await client.call_tool("get_resource", {"resource": "deploy", "name": "web", "namespace": "prod",
                                                      "reason": "check the image"})  # fmt: skip
        assert not got.is_error, text(got)
        assert json.loads(text(got))["metadata"]["name"] == "web"

        described = await client.call_tool("describe", {"resource": "pods", "name": "web", "namespace": "prod",
                                                        "reason": "why is it slow"})  # fmt: skip
        assert not described.is_error, text(described)
        body = json.loads(text(described))
        assert body["object"]["kind"] == "Pod" and isinstance(body["events"], list)

        logs = await client.call_tool("logs", {"pod": "web", "namespace": "prod", "tail_lines": 3,
                                               "reason": "look for errors"})  # fmt: skip
        assert not logs.is_error, text(logs)
        lines = text(logs).splitlines()
        assert 1 <= len(lines) <= 3 and "request" in lines[-1]
        # The log line embeds the database password and a cloud key: masked on the way to the agent.
        assert DB_PASSWORD not in text(logs) and AWS_SECRET_ACCESS_KEY not in text(logs)


async def test_a_secret_read_is_masked_everywhere_the_agent_can_see(gw):
    async with agent(gw) as client:
        got = await client.call_tool("get_resource", {"resource": "secrets", "name": "db-credentials",
                                                      "namespace": "prod", "reason": "check the keys"})  # fmt: skip
        described = await client.call_tool("describe", {"resource": "secrets", "name": "db-credentials",
                                                        "namespace": "prod", "reason": "check the keys"})  # fmt: skip
        listed = await client.call_tool("list_resources", {"resource": "secrets", "namespace": "prod",
                                                           "reason": "which secrets exist"})  # fmt: skip
    secret = json.loads(text(got))
    assert set(secret["data"]) == {"username", "password", "api-token"}
    import base64

    everything = text(got) + text(described) + text(listed)
    for value in (DB_PASSWORD, API_TOKEN):
        assert value not in everything
        assert base64.b64encode(value.encode()).decode() not in everything


async def test_logs_are_bounded(gw):
    async with agent(gw) as client:
        logs = await client.call_tool("logs", {"pod": "web", "namespace": "prod", "tail_lines": 100000,
                                               "reason": "too much"})  # fmt: skip
    assert logs.is_error  # the tool's own bound: le=5000 lines
    async with agent(gw) as client:
        logs = await client.call_tool("logs", {"pod": "web", "namespace": "prod", "tail_lines": 5000,
                                               "reason": "all of it"})  # fmt: skip
    assert not logs.is_error and len(text(logs).encode()) <= 64 * 1024 + 20


# -- approvals -----------------------------------------------------------------------------------------


async def test_a_delete_is_held_until_a_reviewer_approves_then_completes(gw, own_sandbox):
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    reason = "worker is wedged; deleting it lets the controller replace it"
    result: dict[str, Any] = {}

    async def call() -> None:
        async with agent(gw) as client:
            result["answer"] = await client.call_tool(
                "delete",
                {"resource": "pods", "name": "worker", "namespace": "prod", "reason": reason},
                progress_callback=on_progress,
            )

    import asyncio

    task = asyncio.ensure_future(call())
    item = await asyncio.to_thread(pending, gw, name="worker")
    assert item["requester"] == AGENT[0] and item["intent"] == reason
    await asyncio.sleep(1.5)
    assert not task.done()  # held
    status, answer = await asyncio.to_thread(
        gateway_api, gw, "POST", f"/api/approvals/{item['id']}/approve", REVIEWER[2], {"comment": "ok"}
    )
    assert status == 200 and answer["state"] == "approved", answer
    await asyncio.wait_for(task, 30)
    assert not result["answer"].is_error, text(result["answer"])
    assert json.loads(text(result["answer"]))["deleted"]["name"] == "worker"
    # Progress while held, naming the approval request and its rule (the caller sees its own requests).
    assert progress and all("approval" in (message or "") for _, message in progress)
    assert any(
        f"held for approval {item['id']} (rule agents-deletes-held" in (m or "") for _, m in progress
    ), progress
    gone = run_kubectl(own_sandbox.kubeconfig, "get", "pod", "worker", "-n", "prod")
    assert gone.returncode == 1 and "NotFound" in gone.stderr
    # The tool call's event: tool, reason, identity, the API request it made (the one the approval let through).
    event = wait_for(lambda: next(iter(tool_events(gw, "delete")), None), what="the delete's mcp_tool event")
    data = event["data"]
    assert data["intent"] == reason and data["identity"]["user"] == AGENT[0] and data["outcome"] == "ok"
    assert data["arguments"] == {"resource": "pods", "name": "worker", "namespace": "prod"}
    requests = [e for e in audit(gw) if e["kind"] == "request" and e["request_id"] in data["request_ids"]]
    assert len(requests) == 1 and requests[0]["data"]["intent"] == reason
    assert requests[0]["data"]["approval"]["approval_id"] == item["id"]
    # The event the webhook plugin sends reviewers (approval.requested) carries the reason too.
    asked = [
        e for e in audit(gw) if e["kind"] == "approval.requested" and e["data"]["approval_id"] == item["id"]
    ]
    assert [e["data"]["intent"] for e in asked] == [reason]


async def test_a_denial_returns_the_reviewers_comment(gw, own_sandbox):
    import asyncio

    async def call() -> Any:
        async with agent(gw) as client:
            return await client.call_tool("delete", {"resource": "pods", "name": "web-0", "namespace": "prod",
                                                     "reason": "cleanup"})  # fmt: skip

    task = asyncio.ensure_future(call())
    item = await asyncio.to_thread(pending, gw, name="web-0")
    status, _ = await asyncio.to_thread(
        gateway_api, gw, "POST", f"/api/approvals/{item['id']}/deny", REVIEWER[2], {"comment": "not during the freeze"}
    )  # fmt: skip
    assert status == 200
    answer = await asyncio.wait_for(task, 30)
    assert answer.is_error and "denied by rita: not during the freeze" in text(answer)
    run_kubectl(own_sandbox.kubeconfig, "get", "pod", "web-0", "-n", "prod", check=True)  # still there
    event = wait_for(lambda: next((e for e in tool_events(gw, "delete") if e["data"]["outcome"] == "error"), None),
                     what="the denied delete's event")  # fmt: skip
    assert "not during the freeze" in event["data"]["error"]


# -- authentication -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "connection"),
    [("", "sandbox"), ("not-a-token", "sandbox"), (OUTSIDER[2], "sandbox"), (AGENT[2], "other")],
    ids=["no-token", "unknown-token", "other-connections-token", "token-on-another-connection"],
)
def test_unauthenticated_and_wrong_connection_tokens_are_refused(gw, token, connection):
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    answer = httpx2.post(f"{gw.url}/mcp/{connection}", json=body, headers=headers, verify=context)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_token"
    assert answer.headers["www-authenticate"].startswith("Bearer ")
    if (
        connection == "sandbox"
    ):  # audited (that connection has sinks): a fingerprint of the token, never the token
        fingerprint = "sha256:" + hashlib.sha256(token.encode()).hexdigest() if token else None

        def refusal() -> dict[str, Any] | None:
            found = [e for e in audit(gw) if e["kind"] == "mcp_unauthenticated"]
            return next((e for e in found if e["data"]["credential"] == fingerprint), None)

        event = wait_for(refusal, what="the refusal's audit event")
        assert event["data"]["status"] == 401 and event["data"]["path"] == "/mcp/sandbox"
        assert not token or token not in json.dumps(audit(gw))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversized_mcp_message_is_refused_and_the_endpoint_stays_up(gw, declared):
    from kubegate.plugins.mcp.endpoint import body_cap

    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "Authorization": f"Bearer {AGENT[2]}"}  # fmt: skip
    padding = "x" * (body_cap(3 * 1024 * 1024) + 1)  # the default limits.max_request_body_bytes
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"pad": padding}}
    ).encode()
    content = body if declared else (body[i : i + 65536] for i in range(0, len(body), 65536))
    answer = httpx2.post(f"{gw.url}/mcp/sandbox", content=content, headers=headers, verify=context)
    assert answer.status_code == 413 and answer.json()["error"] == "request_too_large"
    small = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    assert (
        httpx2.post(f"{gw.url}/mcp/sandbox", json=small, headers=headers, verify=context).status_code == 200
    )


async def test_the_sdk_client_is_refused_too(gw):
    with pytest.raises(Exception):  # noqa: B017 - the SDK reports the 401 its own way
        async with agent(gw, token="not-a-token") as client:
            await client.list_tools()


def test_a_connection_without_the_plugin_has_no_endpoint(gw):
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    for path in ("/mcp/no-mcp", "/mcp/nowhere", "/mcp/sandbox/../no-mcp", "/mcp/"):
        answer = httpx2.post(f"{gw.url}{path}", json={}, verify=context,
                             headers={"Authorization": f"Bearer {AGENT[2]}"})  # fmt: skip
        assert answer.status_code == 404, path


# -- adversarial ---------------------------------------------------------------------------------------


async def test_a_secret_in_the_reason_is_masked_in_audit(gw):
    # Known values (the cluster's Secrets) and a pattern the masking rules know, as an agent might paste them.
    reason = f"testing the login with {DB_PASSWORD}, token {API_TOKEN}, AWS_SECRET_ACCESS_KEY={AWS_SECRET_ACCESS_KEY}"
    async with agent(gw) as client:
        answer = await client.call_tool("get_resource", {"resource": "configmaps", "name": "app-config",
                                                         "namespace": "prod", "reason": reason})  # fmt: skip
    assert not answer.is_error, text(answer)
    event = wait_for(
        lambda: next((e for e in tool_events(gw, "get_resource") if "testing the login" in e["data"]["intent"]), None),
        what="the get's mcp_tool event",
    )  # fmt: skip
    records = json.dumps(
        [e for e in audit(gw) if e["request_id"] in [event["request_id"], *event["data"]["request_ids"]]]
    )
    assert "testing the login" in records
    for value in (DB_PASSWORD, API_TOKEN, AWS_SECRET_ACCESS_KEY):
        assert value not in records


async def test_a_huge_or_empty_reason_is_refused_before_anything_is_sent(gw, own_sandbox):
    before = last_entry(own_sandbox)
    async with agent(gw) as client:
        huge = await client.call_tool("get_resource", {"resource": "pods", "name": "web", "namespace": "prod",
                                                       "reason": "x" * 5000})  # fmt: skip
        blank = await client.call_tool("get_resource", {"resource": "pods", "name": "web", "namespace": "prod",
                                                        "reason": "   "})  # fmt: skip
        missing = await client.call_tool(
            "get_resource", {"resource": "pods", "name": "web", "namespace": "prod"}
        )
    assert huge.is_error and blank.is_error and missing.is_error
    assert agents_requests(own_sandbox, before) == []


@pytest.mark.parametrize(
    "arguments",
    [
        {"resource": "pods", "name": "../../secrets", "namespace": "prod"},
        {"resource": "pods", "name": "..", "namespace": "prod"},
        {"resource": "pods", "name": "web/exec", "namespace": "prod"},
        {"resource": "pods", "name": "web%2f..", "namespace": "prod"},
        {"resource": "pods", "name": "web", "namespace": "prod/secrets"},
        {"resource": "pods", "name": "web", "namespace": "../kube-system"},
        {"resource": "pods/exec", "name": "web", "namespace": "prod"},
        {"resource": "secrets", "name": "db-credentials", "namespace": "prod", "api_version": "v1/../../x"},
    ],
)
async def test_path_tricks_are_refused_before_anything_is_sent(gw, own_sandbox, arguments):
    before = last_entry(own_sandbox)
    async with agent(gw) as client:
        answer = await client.call_tool("get_resource", {**arguments, "reason": "probing"})
    assert answer.is_error
    assert DB_PASSWORD not in text(answer)
    assert agents_requests(own_sandbox, before) == []


async def test_a_name_with_odd_characters_is_encoded_and_stays_a_name(gw, own_sandbox):
    before = last_entry(own_sandbox)
    async with agent(gw) as client:
        answer = await client.call_tool("get_resource", {"resource": "pods", "name": "web?x=1#y", "namespace": "prod",
                                                         "reason": "probing"})  # fmt: skip
    assert answer.is_error and "404" in text(answer)  # a pod of that name: not found, nothing else read
    sent = agents_requests(own_sandbox, before)
    assert [(r["method"], r["path"], r["query"]) for r in sent] == [
        ("GET", "/api/v1/namespaces/prod/pods/web?x=1#y", "")
    ]


# -- writes, exec, replay ------------------------------------------------------------------------------


@pytest.mark.needs_pods
async def test_apply_scale_restart_and_exec_go_through_the_data_path(gw, own_sandbox):
    manifest = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: agent-notes\n  namespace: prod\ndata:\n  a: b\n"
    )
    async with agent(gw) as client:
        applied = await client.call_tool("apply", {"manifest": manifest, "reason": "leave a note"})
        assert not applied.is_error, text(applied)
        scaled = await client.call_tool("scale", {"name": "web", "namespace": "prod", "replicas": 3,
                                                  "reason": "more traffic"})  # fmt: skip
        assert not scaled.is_error and json.loads(text(scaled))["replicas"] == 3, text(scaled)
        restarted = await client.call_tool("rollout_restart", {"name": "web", "namespace": "prod",
                                                               "reason": "pick up the new config"})  # fmt: skip
        assert not restarted.is_error, text(restarted)
        ran = await client.call_tool("exec", {"pod": "web", "namespace": "prod", "command": ["sh", "-c",
                                              "echo hello; echo $DB_PASSWORD; exit 3"], "reason": "check env"})  # fmt: skip
    assert not ran.is_error, text(ran)
    output = json.loads(text(ran))
    assert output["stdout"].startswith("hello") and output["exit_code"] == 3
    assert DB_PASSWORD not in text(ran)
    note = run_kubectl(own_sandbox.kubeconfig, "get", "configmap", "agent-notes", "-n", "prod", "-o", "json",
                       check=True)  # fmt: skip
    assert json.loads(note.stdout)["data"] == {"a": "b"}
    applies = [
        r
        for r in agents_requests(own_sandbox)
        if r["method"] == "PATCH" and r["path"].endswith("/agent-notes")
    ]
    assert len(applies) == 1 and applies[0]["query"] == "fieldManager=kubegate-mcp"
    assert applies[0]["headers"]["content-type"] == ["application/apply-patch+yaml"]
    deploy = json.loads(run_kubectl(own_sandbox.kubeconfig, "get", "deploy", "web", "-n", "prod", "-o", "json",
                                    check=True).stdout)  # fmt: skip
    assert deploy["spec"]["replicas"] == 3
    assert "kubectl.kubernetes.io/restartedAt" in deploy["spec"]["template"]["metadata"]["annotations"]


def test_replay_shows_tool_calls_and_kubectl_calls_in_order(gw):
    kubeconfig = gw.kubeconfig(AGENT[0], token=AGENT[2])
    run_kubectl(kubeconfig, "get", "configmap", "app-config", "-n", "prod", check=True)
    wait_for(lambda: any(e["kind"] == "mcp_tool" for e in audit(gw)), what="a tool call in the audit")
    replay = subprocess.run(
        [KUBEGATE, "replay", "--user", AGENT[0], "--config", str(gw.config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    rows = replay.stderr.splitlines()  # the walk's rows go to stderr, sessions' output to stdout
    tool_rows = [i for i, row in enumerate(rows) if " mcp_tool " in row]
    kubectl_rows = [
        i
        for i, row in enumerate(rows)
        if "get configmaps app-config -n prod" in row and "[kubectl get]" in row
    ]
    assert tool_rows and kubectl_rows, replay.stderr
    assert any("mcp delete pods worker -n prod" in rows[i] and "ok" in rows[i] for i in tool_rows), (
        replay.stderr
    )
    assert max(tool_rows) < max(kubectl_rows)  # in time order: the kubectl call came last


async def test_a_secret_applied_by_the_agent_is_masked_in_every_record(gw, own_sandbox):
    value = "zz-agent-applied-value-8c1f"
    manifest = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "agent-made", "namespace": "dev"},
                           "stringData": {"token": value}})  # fmt: skip
    async with agent(gw) as client:
        applied = await client.call_tool("apply", {"manifest": manifest, "reason": "store the new token"})
        got = await client.call_tool("get_resource", {"resource": "secrets", "name": "agent-made", "namespace": "dev",
                                                      "reason": "check it"})  # fmt: skip
    assert not applied.is_error and not got.is_error, text(applied) + text(got)
    assert value not in text(applied) + text(got)
    event = wait_for(lambda: next((e for e in tool_events(gw, "apply") if e["data"]["intent"] == "store the new token"),
                                  None), what="the apply's event")  # fmt: skip
    records = [
        e for e in audit(gw) if e["request_id"] in [event["request_id"], *event["data"]["request_ids"]]
    ]
    assert len(records) == 2 and "agent-made" in json.dumps(records)
    assert value not in json.dumps(records)


def test_a_kubectl_user_may_state_an_intent_it_is_recorded_and_bounded(gw, own_sandbox):
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(gw.ca_file))

    def get(intent: str) -> int:
        request = urllib.request.Request(f"{gw.url}/k8s/sandbox/api/v1/namespaces/prod/configmaps/app-config",
                                         headers={"Authorization": f"Bearer {AGENT[2]}", "Kubegate-Intent": intent})  # fmt: skip
        try:
            with urllib.request.urlopen(request, context=context, timeout=20) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    since = last_entry(own_sandbox)
    assert get("on-call%3A checking the config") == 200
    forwarded = agents_requests(own_sandbox, since)  # the intent is the gateway's: never sent upstream
    assert forwarded and all("kubegate-intent" not in {h.lower() for h in r["headers"]} for r in forwarded)
    wait_for(lambda: any(e["kind"] == "request" and e["data"].get("intent") == "on-call: checking the config"
                         for e in audit(gw)), what="the request's intent in its audit event")  # fmt: skip
    assert get("x" * 1001) == 400
