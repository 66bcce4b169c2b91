"""The proxy's refusals, driven in process: the gateway's ASGI app is called directly (no listening socket,
no TLS, no kubectl), so each path is exercised exactly and fast.

Every refusal a client hears is a Kubernetes `Status` (kubectl prints its message as the API server's own),
none reaches the cluster, and each leaves exactly one audit event with the status it ended with. The same
paths over real sockets and real kubectl are in tests/e2e/test_gateway_errors.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetest import wait_for_async

from kubegate.core import hookimpl
from kubegate.core.flow import AuditEvent, Decision, Flow, Verdict
from kubegate.core.gateway import Gateway
from kubegate.core.plugins import PluginHost
from kubegate.core.proxy import LEFT_BEFORE_RESPONSE

try:
    from kubegate import testing
except ImportError:  # the kubegate.testing name is mapped in pyproject.toml; the module is core/testing
    from kubegate.core import testing

ALICE_TOKEN = "alice-token-0123456789abcdef"
BODY_CAP = 1024


class Guard:
    """A policy and approval plugin of this test: denies namespace deletes, holds ConfigMap creates and pod
    execs until the client leaves, holds ConfigMap deletes and denies them at once (a reviewer's "no"),
    reads the body of Secret creates while deciding, and keeps every audit event."""

    PLUGIN_NAME = "refusal-guard"

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.held = asyncio.Event()
        self.client_left = asyncio.Event()

    @hookimpl
    async def kubegate_decide(self, flow: Flow) -> Decision | None:
        attributes = flow.attributes
        if attributes.resource == "namespaces" and attributes.verb == "delete":
            return Decision.deny("namespaces cannot be deleted through this gateway", rule="no-ns-deletes")
        if attributes.resource == "configmaps" and attributes.verb in ("create", "delete"):
            return Decision(Verdict.NEEDS_APPROVAL, "configmaps need a second person", rule="hold-cms")
        if attributes.subresource == "exec":
            return Decision(Verdict.NEEDS_APPROVAL, "exec needs a second person", rule="hold-exec")
        if attributes.resource == "secrets" and attributes.verb == "create":
            await flow.request.read_body()  # as a policy on the request object does
        return None

    @hookimpl
    async def kubegate_approval(self, flow: Flow, decision: Decision) -> Decision:
        if flow.attributes.verb == "delete":
            return Decision.deny("denied by rita: not during the freeze", decision.rule)
        # As the approvals plugin does: wait for the reviewers, or stop waiting when the client leaves.
        self.held.set()
        await flow.request.wait_disconnected()
        self.client_left.set()
        return Decision.deny("the client went away while waiting for approval", decision.rule)

    @hookimpl
    def kubegate_audit_event(self, event: AuditEvent) -> None:
        self.events.append(event)

    def requests(self) -> list[dict[str, Any]]:
        return [event.data for event in self.events if event.kind == "request"]


@dataclass
class Answer:
    """What the ASGI app sent back."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    unread: int = field(default=0, compare=False)  # pieces of the request body the app never took

    def kubernetes_status(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/json", self.headers
        doc: dict[str, Any] = json.loads(self.body)
        return doc


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    token: str | None = ALICE_TOKEN,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: list[bytes] | None = None,
    unfinished: bool = False,
    leave: asyncio.Event | None = None,
    http_version: str = "1.1",
) -> Answer:
    """One HTTP request to the ASGI `app`, with the body in the given pieces (the last one announcing
    more when `unfinished`); with `leave`, the client disconnects (``http.disconnect``) once the body is
    sent and `leave` is set, else once its response is complete."""
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if token is not None:
        raw_headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
    }
    pieces = list(body if body is not None else [b""])
    answer = Answer()
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces) or unfinished}
        if leave is not None:
            await leave.wait()
        else:
            await done.wait()  # a client that stays until its response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    await asyncio.wait_for(app(scope, receive, send), 30)
    answer.unread = len(pieces)
    return answer


def assert_status(answer: Answer, code: int, reason: str, message: str) -> dict[str, Any]:
    """`answer` is the Kubernetes Status kubectl prints: kind, apiVersion, status, code, reason, message."""
    assert answer.status == code, answer
    doc = answer.kubernetes_status()
    assert doc["kind"] == "Status" and doc["apiVersion"] == "v1" and doc["status"] == "Failure", doc
    assert doc["code"] == code and doc["reason"] == reason, doc
    assert message in doc["message"], doc
    return doc


async def _swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream that reads whatever it is sent and never answers."""
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Guard]]:
    """A gateway in this process. Connection `prod` points at a port nothing listens on: any request that
    got through would end in a 503, so a refusal with another code proves the cluster was never asked.
    Connection `mute` points at an upstream that reads request bodies and never answers (the only socket
    here: a body streams upstream only once a connection is open)."""
    mute = await asyncio.start_server(_swallow, "127.0.0.1", 0)
    mute_port = mute.sockets[0].getsockname()[1]
    guard = Guard()
    (tmp_path / "upstream-token").write_text("gateway-credential")
    upstream = {
        "server": f"https://127.0.0.1:{testing.free_port()}",  # nobody listens: refused at once
        "token_file": str(tmp_path / "upstream-token"),
    }
    tokens = {"alice": (ALICE_TOKEN, ["developers"])}
    plugins = {"static-tokens": testing.static_tokens(tokens), Guard.PLUGIN_NAME: {}}
    config = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "limits": {"max_request_body_bytes": BODY_CAP, "upstream_connect_timeout_seconds": 2},
        "connections": {
            "prod": {"upstream": upstream, "plugins": plugins},
            "mute": {"upstream": {**upstream, "server": f"http://127.0.0.1:{mute_port}"}, "plugins": plugins},
        },
    }
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = Gateway.from_config(path, plugins=PluginHost(load_entry_points=False, extra=[guard]))
    await gateway.start()
    try:
        yield gateway, guard
    finally:
        await gateway.stop()
        mute.close()


PODS = "/k8s/prod/api/v1/namespaces/dev/pods"
MUTE_PODS = "/k8s/mute/api/v1/namespaces/dev/pods"


# -- 401: no credential, an unknown one ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "why"), [(None, "no credential"), ("not-a-known-token", "unknown credential")]
)
async def test_no_or_unknown_token_is_a_401_status(served, token, why):
    gateway, guard = served
    answer = await call(gateway, "GET", PODS, token=token)
    assert_status(answer, 401, "Unauthorized", "Unauthorized")
    (event,) = guard.requests()
    assert event["status"] == 401 and event["identity"] is None and event["auth_failure"] == why
    if token:  # the audit names the credential by fingerprint, never by value
        assert event["credential"] == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        assert token not in json.dumps(event)


# -- 400/404/405: refused while the request is read -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "code", "message"),
    [
        ("GET", "/k8s/prod/api/v1/namespaces/dev/../kube-system/secrets", "", 400, "dot segment"),
        ("GET", "/k8s/prod/api/v1/namespaces/dev/%2e%2e/secrets", "", 400, "encoded separator"),
        ("TRACE", PODS, "", 405, "TRACE"),
        ("GET", PODS, "limit=1;watch=1", 400, ";"),
    ],
    ids=["dot-segment", "encoded-dot", "method", "query"],
)
async def test_a_request_refused_while_it_is_read_leaves_one_audit_event(
    served, method, path, query, code, message
):
    """Refused before authentication and before anyone decides: the event says what was sent, how it was
    refused and by whose credential (its fingerprint), as for a 401."""
    gateway, guard = served
    answer = await call(gateway, method, path, query=query)
    assert answer.status == code and message in answer.kubernetes_status()["message"], answer
    (event,) = guard.requests()
    assert event["status"] == code and message in event["error"]
    assert event["method"] == method and event["path"] == path.removeprefix("/k8s/prod")
    assert event["identity"] is None and event["decision"] is None and "auth_failure" not in event
    assert event["credential"] == "sha256:" + hashlib.sha256(ALICE_TOKEN.encode()).hexdigest()
    if query:
        assert event["raw_query"] == query and event["query"] == ""


async def test_a_websocket_refused_while_it_is_read_leaves_one_audit_event(served):
    gateway, guard = served
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "wss",
        "path": "/k8s/prod/api/v1/namespaces/dev/pods/web/exec",
        "raw_path": b"/k8s/prod/api/v1/namespaces/dev/pods/web/exec",
        "query_string": b"command=sh;stdin=true", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 443),
        "headers": [(b"authorization", f"Bearer {ALICE_TOKEN}".encode())], "subprotocols": ["v5.channel.k8s.io"],
    }  # fmt: skip
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(gateway(scope, receive, send), 10)
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 400
    (event,) = guard.requests()
    assert (
        event["status"] == 400 and event["raw_query"] == "command=sh;stdin=true" and event["identity"] is None
    )


async def test_a_request_for_no_connection_is_refused_and_recorded_nowhere(served):
    gateway, guard = served
    answer = await call(gateway, "GET", "/k8s/nope/api/v1/pods")
    assert_status(answer, 404, "NotFound", 'connection "nope" not found')
    assert guard.requests() == []


@pytest.mark.parametrize(
    ("path", "headers", "code"),
    [
        ("/k8s/nope/api/v1/namespaces/dev/configmaps", {}, 404),  # before anything knows a body cap
        ("/k8s/prod/api/v1/namespaces/dev/configmaps", {"content-length": str(10**15)}, 413),
    ],
)
@pytest.mark.parametrize("http_version", ["1.1", "2"])
async def test_a_refused_requests_body_is_read_only_so_far_then_the_connection_closes(
    served, path, headers, code, http_version
):
    """A refused request's body was read to its end: an endless one for ever, on one connection, without a
    token. Now at most Go's 256 KiB (a request for no connection) or twice the body cap (a refusal that
    knows the cap) are read, and over HTTP/1.x the answer says `connection: close` (core/http1.py closes
    it; HTTP/2 has no such header)."""
    gateway, _ = served
    piece = b"a" * 65536
    answer = await call(
        gateway,
        "POST",
        path,
        token=None,
        headers=headers,
        body=[piece] * 100,
        unfinished=True,
        http_version=http_version,
    )
    assert answer.status == code and answer.kubernetes_status()["code"] == code
    assert (100 - answer.unread) * len(piece) <= max(256 * 1024, 2 * BODY_CAP) + len(piece)
    assert answer.headers.get("connection") == ("close" if http_version == "1.1" else None)


async def test_a_refused_requests_body_read_to_its_end_keeps_the_connection(served):
    gateway, _ = served
    body = [b'{"kind": "Pod"}', b"x" * 100]
    answer = await call(gateway, "POST", "/k8s/nope/api/v1/namespaces/dev/pods", body=body)
    assert answer.status == 404 and answer.unread == 0
    assert "connection" not in answer.headers
    answer = await call(gateway, "POST", PODS, token="not-a-known-token", body=body)
    assert answer.status == 401 and answer.unread == 0
    assert "connection" not in answer.headers


# -- 403: a policy denial --------------------------------------------------------------------------------


async def test_policy_deny_is_a_403_status_naming_the_reason(served):
    gateway, guard = served
    answer = await call(gateway, "DELETE", "/k8s/prod/api/v1/namespaces/dev")
    doc = assert_status(answer, 403, "Forbidden", "namespaces cannot be deleted through this gateway")
    assert doc["details"]["name"] == "dev" and doc["details"]["kind"] == "namespaces", doc
    (event,) = guard.requests()
    assert event["status"] == 403 and event["identity"]["user"] == "alice"
    assert event["decision"] == {
        "verdict": "deny",
        "reason": "namespaces cannot be deleted through this gateway",
        "rule": "no-ns-deletes",
    }


# -- 400: a JSON patch whose pointers the API server reads otherwise ---------------------------------------


async def test_a_json_patch_pointer_the_api_server_reads_otherwise_is_a_400_status_before_any_decision(
    served,
):
    gateway, guard = served
    ops = b'[{"op":"copy","from":"x/data/password","path":"/metadata/annotations/leak"}]'
    headers = {"content-type": "application/json-patch+json"}
    answer = await call(
        gateway, "PATCH", "/k8s/prod/api/v1/namespaces/dev/secrets/db", headers=headers, body=[ops]
    )
    assert_status(answer, 400, "BadRequest", "the JSON patch's from 'x/data/password' (operation 0) does not")
    (event,) = guard.requests()
    assert event["status"] == 400 and event["decision"] is None  # no plugin was asked
    # through pods/proxy the body is the container's: passed on (to an upstream that is not there: 503)
    proxied = await call(gateway, "PATCH", "/k8s/prod/api/v1/namespaces/dev/pods/web/proxy/x", headers=headers,
                         body=[ops])  # fmt: skip
    assert proxied.status == 503


# -- 413: a body over max_request_body_bytes -------------------------------------------------------------


async def test_declared_oversize_body_is_a_413_status_before_anyone_decides(served):
    gateway, guard = served
    body = b"x" * (BODY_CAP + 1)
    answer = await call(
        gateway, "POST", PODS, headers={"content-length": str(len(body))}, body=[body[:100], body[100:]]
    )
    assert_status(answer, 413, "RequestEntityTooLarge", f"larger than the limit of {BODY_CAP} bytes")
    (event,) = guard.requests()
    assert event["status"] == 413


async def test_undeclared_oversize_body_is_a_413_status_once_it_passes_the_cap(served):
    """Chunked: no Content-Length to refuse on, so the cap is enforced while the body streams."""
    gateway, guard = served
    pieces = [b"y" * 600, b"y" * 600]  # 1200 > 1024 only with the second piece
    answer = await call(gateway, "POST", MUTE_PODS, body=pieces)
    assert_status(answer, 413, "RequestEntityTooLarge", f"larger than the limit of {BODY_CAP} bytes")
    (event,) = guard.requests()
    assert event["status"] == 413


async def test_a_body_at_the_cap_is_not_refused_as_too_large(served):
    """The boundary: exactly max_request_body_bytes goes on (here to the absent upstream: 503)."""
    gateway, _ = served
    body = b"z" * BODY_CAP
    answer = await call(gateway, "POST", PODS, headers={"content-length": str(BODY_CAP)}, body=[body])
    assert answer.status == 503, answer


# -- 499: the client went away -----------------------------------------------------------------------------


async def test_client_leaving_before_its_body_is_recorded_as_499_and_nothing_is_sent(served):
    gateway, guard = served
    gone = asyncio.Event()
    gone.set()  # headers of a PUT, then the client disconnects before any of the body
    answer = await call(gateway, "PUT", f"{MUTE_PODS}/web", body=[], leave=gone)
    assert answer == Answer()  # nobody is there to hear an answer: nothing is sent
    (event,) = guard.requests()
    assert event["status"] == 499 and event["identity"]["user"] == "alice"


async def test_client_leaving_mid_body_is_recorded_as_499_not_as_an_unavailable_upstream(served):
    """aiohttp wraps what the body stream raised in a ClientOSError: the cluster must not be blamed."""
    gateway, guard = served
    gone = asyncio.Event()
    gone.set()  # the client disconnects after its first piece, with more of the body announced
    answer = await call(
        gateway, "PUT", f"{MUTE_PODS}/web", body=[b'{"kind": "Pod",'], unfinished=True, leave=gone
    )
    (event,) = guard.requests()
    assert event["status"] == 499, event["error"]
    assert answer == Answer()


async def test_client_leaving_while_held_stops_the_hold_and_is_recorded_as_499(served):
    gateway, guard = served
    leave = asyncio.Event()
    request = asyncio.create_task(
        call(gateway, "POST", "/k8s/prod/api/v1/namespaces/dev/configmaps", body=[b"{}"], leave=leave)
    )
    await wait_for_async(guard.held.is_set, "the request to be held for approval", timeout=10)
    assert not request.done()  # held: no answer while the reviewers have not decided
    leave.set()
    answer = await asyncio.wait_for(request, 10)
    assert guard.client_left.is_set()
    # Nobody is there to hear an answer: nothing is sent, and the record says the client left (499), never
    # a refusal by policy (403) nor a 503 (which would mean the gateway tried the cluster).
    assert answer == Answer()
    (event,) = guard.requests()
    assert event["status"] == 499 and event["error"] == "the client went away while waiting for approval"
    assert event["decision"]["rule"] == "hold-cms" and event["identity"]["user"] == "alice"


async def test_a_hold_refused_while_the_client_waits_is_still_a_403_status(served):
    """Only a client that really left turns a refusal into 499: a reviewer's "no" is heard and recorded."""
    gateway, guard = served
    answer = await call(gateway, "DELETE", "/k8s/prod/api/v1/namespaces/dev/configmaps/app")
    assert_status(answer, 403, "Forbidden", "denied by rita: not during the freeze")
    (event,) = guard.requests()
    assert event["status"] == 403 and event["error"] == "denied by rita: not during the freeze"


async def test_client_leaving_while_its_body_is_read_for_the_decision_is_499_not_a_policy_failure(served):
    """A plugin reading the body in `kubegate_decide` of a client that leaves mid-body: the client left, the
    plugin did not fail (it would be a 403 "policy plugin failed")."""
    gateway, guard = served
    gone = asyncio.Event()
    gone.set()
    answer = await call(
        gateway, "POST", "/k8s/prod/api/v1/namespaces/dev/secrets", body=[b'{"kind":'], unfinished=True,
        leave=gone,
    )  # fmt: skip
    assert answer == Answer()
    (event,) = guard.requests()
    assert event["status"] == 499 and event["error"] is None, event
    assert event["request_body"]["bytes"] == len(b'{"kind":')  # what arrived before the client left


async def test_websocket_client_leaving_while_held_is_recorded_as_499(served):
    gateway, guard = served
    leave = asyncio.Event()
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "wss",
        "path": "/k8s/prod/api/v1/namespaces/dev/pods/web/exec",
        "raw_path": b"/k8s/prod/api/v1/namespaces/dev/pods/web/exec",
        "query_string": b"command=sh&stdin=true&stdout=true",
        "headers": [(b"authorization", f"Bearer {ALICE_TOKEN}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
        "subprotocols": ["v5.channel.k8s.io"],
    }
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await leave.wait()
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    session = asyncio.create_task(gateway(scope, receive, send))
    await wait_for_async(guard.held.is_set, "the exec to be held for approval", timeout=10)
    leave.set()
    await asyncio.wait_for(session, 10)
    assert sent == []  # neither accepted nor refused: the client is gone
    (event,) = guard.requests()
    assert event["status"] == 499 and event["error"] == "the client went away while waiting for approval"
    assert event["decision"]["rule"] == "hold-exec"


# -- 503: the upstream is not there ----------------------------------------------------------------------


async def test_unreachable_upstream_is_a_503_status_naming_the_connection(served):
    gateway, guard = served
    answer = await call(gateway, "GET", PODS)
    assert_status(answer, 503, "ServiceUnavailable", 'connection "prod": the API server is unavailable (')
    (event,) = guard.requests()
    assert event["status"] == 503 and event["identity"]["user"] == "alice"
    assert event["error"].startswith('connection "prod": the API server is unavailable')


# -- the approvals plugin: a client that leaves a held request ---------------------------------------------


class AuditLog:
    """Keeps every audit event of its connection (requests and the approvals plugin's own)."""

    PLUGIN_NAME = "audit-log"

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def kubegate_audit_event(self, event: AuditEvent) -> None:
        self.events.append(event)


async def test_client_leaving_a_request_the_approvals_plugin_holds(tmp_path):
    """With the built-in policy and approvals plugins: the request is recorded as 499 with the approvals
    plugin's message, `approval.client_left` is audited, and the approval request stays pending for the
    reviewers (the store has no cancelled state: a retry of the same request attaches to it)."""
    from kubegate.plugins.approvals import store  # the plugin's own store, read as its reviewers' API does

    audit = AuditLog()
    (tmp_path / "upstream-token").write_text("gateway-credential")
    policy = {
        "default": "allow",
        "rules": [{"name": "hold-cms", "match": {"verbs": ["create"], "resources": ["configmaps"]},
                   "action": "approve", "approval": {"reviewer_groups": ["sre"]}}],
    }  # fmt: skip
    config = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "connections": {
            "prod": {
                "upstream": {
                    "server": f"https://127.0.0.1:{testing.free_port()}",
                    "token_file": str(tmp_path / "upstream-token"),
                },
                "plugins": {
                    "static-tokens": testing.static_tokens({"alice": (ALICE_TOKEN, ["developers"])}),
                    "policy": policy,
                    "approvals": {},
                    AuditLog.PLUGIN_NAME: {},
                },
            }
        },
    }
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = Gateway.from_config(path, plugins=PluginHost(load_entry_points=False, extra=[audit]))
    await gateway.start()
    try:

        async def pending() -> list[store.ApprovalRecord]:
            return await gateway.database.run(lambda s: store.list_approvals(s, states=[store.PENDING]))

        leave = asyncio.Event()
        request = asyncio.create_task(
            call(gateway, "POST", "/k8s/prod/api/v1/namespaces/dev/configmaps", body=[b"{}"], leave=leave)
        )
        held: list[store.ApprovalRecord] = []

        async def is_held() -> bool:
            held[:] = await pending()
            return bool(held)

        await wait_for_async(is_held, "the request to be held for approval", timeout=10)
        assert not request.done()
        leave.set()
        answer = await asyncio.wait_for(request, 10)
        assert answer == Answer()
        requests = [event.data for event in audit.events if event.kind == "request"]
        assert [(e["status"], e["error"]) for e in requests] == [
            (499, "the client went away while waiting for approval")
        ]
        assert requests[0]["approval"]["approval_id"] == held[0].id
        left = [event.data for event in audit.events if event.kind == "approval.client_left"]
        assert left == [{"approval_id": held[0].id}]
        assert [record.id for record in await pending()] == [held[0].id]  # still there for the reviewers
    finally:
        await gateway.stop()


# -- a client that leaves cancels its upstream request (Go cancels the handler's context) -------------------

BIG_BODY = 256 << 20  # what the upstream declares for `/big`: the gateway must not read it all for nobody


@dataclass
class Upstream:
    """An API server on a raw socket, for what a client's leaving does to its upstream request: `.../silent`
    never answers; `.../big` answers 200 with a Content-Length of `BIG_BODY` and sends it slowly enough to
    be cut off; anything else gets a small JSON answer naming its path. Counts what it saw."""

    requests: int = 0
    open: int = 0
    closed: int = 0
    big_sent: int = 0
    big_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                path = head.split(b" ")[1]
                if path.endswith(b"/silent"):
                    await reader.read()  # until the gateway closes the connection
                    return
                if path.endswith(b"/big"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % BIG_BODY)  # fmt: skip
                    while self.big_sent < BIG_BODY:
                        writer.write(b"b" * 65536)
                        await writer.drain()
                        self.big_sent += 65536
                        self.big_started.set()
                        await asyncio.sleep(0)
                    continue
                body = json.dumps({"path": path.decode()}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self.closed += 1
            writer.close()


@pytest.fixture
async def upstream_served(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Guard, Upstream]]:
    """A gateway in this process whose connection `live` points at an `Upstream`; its response timeout is
    longer than any test here waits, so only the client's leaving can end a request early."""
    upstream = Upstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    guard = Guard()
    (tmp_path / "upstream-token").write_text("gateway-credential")
    plugins = {
        "static-tokens": testing.static_tokens({"alice": (ALICE_TOKEN, ["developers"])}),
        Guard.PLUGIN_NAME: {},
    }
    config = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "limits": {"upstream_response_timeout_seconds": 300},
        "connections": {
            "live": {
                "upstream": {
                    "server": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                    "token_file": str(tmp_path / "upstream-token"),
                },
                "plugins": plugins,
            }
        },
    }
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = Gateway.from_config(path, plugins=PluginHost(load_entry_points=False, extra=[guard]))
    await gateway.start()
    try:
        yield gateway, guard, upstream
    finally:
        await gateway.stop()
        server.close()


LIVE_PODS = "/k8s/live/api/v1/namespaces/dev/pods"


async def test_clients_that_leave_at_once_cancel_their_upstream_requests(upstream_served):
    """HTTP/2 rapid reset (CVE-2023-44487): a stream reset right after its HEADERS is an `http.disconnect`
    waiting in the request's queue (Hypercorn never cancels the app). Each such request used to keep its
    upstream request running to its end: 2,700 reset streams made 2,296 concurrent upstream requests. Now
    each is cancelled (its upstream connection closed) and recorded as the client having left."""
    gateway, guard, upstream = upstream_served
    gone = asyncio.Event()
    gone.set()
    answers = await asyncio.wait_for(
        asyncio.gather(*(call(gateway, "GET", f"{LIVE_PODS}/silent", leave=gone) for _ in range(50))), 20
    )
    assert answers == [Answer()] * 50  # nobody is there to hear an answer
    await wait_for_async(lambda: upstream.open == 0, "every upstream request to be closed", timeout=10)
    events = guard.requests()
    assert len(events) == 50
    assert {(e["status"], e["error"]) for e in events} == {(499, LEFT_BEFORE_RESPONSE)}


async def test_a_client_leaving_while_the_api_server_thinks_cancels_the_upstream_request(upstream_served):
    gateway, guard, upstream = upstream_served
    leave = asyncio.Event()
    request = asyncio.create_task(call(gateway, "GET", f"{LIVE_PODS}/silent", leave=leave))
    await wait_for_async(lambda: upstream.requests == 1, "the request to reach the API server", timeout=10)
    leave.set()
    assert await asyncio.wait_for(request, 10) == Answer()
    await wait_for_async(lambda: upstream.closed == 1, "the upstream connection to be closed", timeout=10)
    (event,) = guard.requests()
    assert event["status"] == 499 and event["error"] == LEFT_BEFORE_RESPONSE


async def test_a_client_leaving_mid_body_stops_a_response_with_a_length(upstream_served):
    """A body with a Content-Length used to be read to its end for a client that was gone (a 1.6 GB of
    responses read for nobody); its upstream connection is now closed, not returned to the pool half-read,
    and the next request gets its own answer."""
    gateway, guard, upstream = upstream_served
    leave = asyncio.Event()
    request = asyncio.create_task(call(gateway, "GET", f"{LIVE_PODS}/big", leave=leave))
    await asyncio.wait_for(upstream.big_started.wait(), 10)
    leave.set()
    answer = await asyncio.wait_for(request, 30)
    assert answer.status == 200 and len(answer.body) < BIG_BODY
    await wait_for_async(lambda: upstream.closed == 1, "the upstream connection to be closed", timeout=10)
    assert upstream.big_sent < BIG_BODY
    (event,) = guard.requests()
    assert event["status"] == 200 and event["bytes"] < BIG_BODY  # the status went out; the body was cut

    answer = await call(gateway, "GET", f"{LIVE_PODS}/next")
    assert answer.status == 200 and json.loads(answer.body) == {"path": "/api/v1/namespaces/dev/pods/next"}


async def test_a_client_leaving_mid_body_stops_the_response_to_a_streamed_request(upstream_served):
    """A request body that streamed upstream (more than its first piece): the client is watched once the
    body was sent whole, for the response's body too."""
    gateway, guard, upstream = upstream_served
    leave = asyncio.Event()
    body = [b'{"kind": "Pod", ', b'"apiVersion": "v1"}']
    request = asyncio.create_task(call(gateway, "PUT", f"{LIVE_PODS}/big", body=body, leave=leave))
    await asyncio.wait_for(upstream.big_started.wait(), 10)
    leave.set()
    answer = await asyncio.wait_for(request, 30)
    assert answer.status == 200 and len(answer.body) < BIG_BODY
    await wait_for_async(lambda: upstream.closed == 1, "the upstream connection to be closed", timeout=10)
    (event,) = guard.requests()
    assert event["status"] == 200 and event["bytes"] < BIG_BODY
