"""Requests crafted so that the gateway and the API server could read them differently (issue 13 §1).

A developer token (alice) sends raw bytes through a real gateway to the sandbox, which reads requests the
way the Go API server does (sandbox/goparse.py, written apart from core/attributes.py) and logs what it
acted on. Each test asserts on what the client got AND on what the sandbox received: a request is either
refused with a Status before it leaves the gateway, or upstream acts on exactly what was decided.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from yarl import URL

from kubegate.core.attributes import parse_query

ALICE = GATEWAY_USERS["alice"][1]
PODS = "/api/v1/namespaces/prod/pods"
EXEC = "/api/v1/namespaces/prod/pods/web/exec"

POLICY = {
    "rules": [
        {"name": "no-pod-watch", "match": {"verbs": ["watch"], "resources": ["pods"]}, "action": "deny",
         "message": "no watching pods"},
        {"name": "no-web-reads", "match": {"verbs": ["get", "list", "watch"], "resources": ["pods"],
                                           "names": ["web", "a,b"]},
         "action": "deny", "message": "web is off limits"},
        {"name": "no-secret-cat", "match": {"resources": ["pods/exec"], "commands": ["cat /secret*", "echo  x"]},
         "action": "deny", "message": "no reading the secret"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    """`sandbox`: the deny rules above; `plain`: no policy. Both audit to `audit.jsonl`."""
    directory = tmp_path_factory.mktemp("gw-parsing")
    config = gateway_config(sandbox, directory, free_port())
    connection = config["connections"]["sandbox"]
    audit = {"testplugin": {"audit_file": str(directory / "audit.jsonl")}}
    config["connections"]["plain"] = {**connection, "plugins": {**connection["plugins"], **audit}}
    connection["plugins"] = {**connection["plugins"], "policy": POLICY, **audit}
    gateway = start_gateway(directory, config, with_test_plugin=True)
    yield gateway
    stop_process(gateway.process)


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


async def send(
    gateway: Gateway,
    path: str,
    query: str = "",
    *,
    method: str = "GET",
    connection: str = "sandbox",
    user_agent: str = "parsing-test",
) -> tuple[int, bytes]:
    """Exactly these path and query bytes (built encoded: nothing requoted, `#` not a fragment). A body is
    read only from a refusal: a watch or a log follow that was let through stays open."""
    url = URL.build(
        scheme="https",
        authority=URL(gateway.url).raw_authority,
        path=f"/k8s/{connection}{path}",
        query_string=query,
        encoded=True,
    )
    headers = {"Authorization": f"Bearer {ALICE}", "User-Agent": user_agent}
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, ssl=ctx) as resp:
            body = await resp.read() if resp.status >= 300 else b""
            return resp.status, body


async def exec_ws(gateway: Gateway, query: str) -> tuple[int, bytes]:
    """An exec the way kubectl opens it: a WebSocket upgrade offering v5.channel.k8s.io. Returns the refusal
    (status, body), or (101, stdout) when it ran."""
    url = URL(f"{gateway.url.replace('https://', 'wss://')}/k8s/sandbox{EXEC}?{query}", encoded=True)
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                url, protocols=["v5.channel.k8s.io"], headers={"Authorization": f"Bearer {ALICE}"}, ssl=ctx
            )
        except aiohttp.WSServerHandshakeError as exc:
            # aiohttp drops the refusal's body; the status is what kubectl would print with it
            return exc.status, b""
        stdout = b""
        async with ws:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x01":
                    stdout += message.data[1:]
        return 101, stdout


def assert_status(status: int, body: bytes, code: int) -> dict[str, Any]:
    assert status == code, body
    doc = json.loads(body)
    assert doc["kind"] == "Status" and doc["code"] == code, doc
    return doc


def received(sandbox, since: int) -> list[dict]:
    return [r for r in sandbox.requests_log(since) if r["path"] != "/readyz"]


# ---------------------------------------------------------------------------------------------------------
# watch: decided as list while upstream watches
# ---------------------------------------------------------------------------------------------------------


async def test_watch_given_twice_is_refused_not_listed(gw, sandbox):
    """Python's parse_qs read the last value (list, allowed); Go reads the first (watch, denied)."""
    since = last_id(sandbox)
    for query in ("watch=1&watch=0", "watch=true&wat%63h=false"):
        status, body = await send(gw, PODS, query)
        assert_status(status, body, 400)
    assert received(sandbox, since) == []


async def test_watch_with_an_empty_value_is_a_watch(gw, sandbox):
    """Convert_Slice_string_To_bool: `watch=` and a bare `watch` are true, so the watch deny rule holds."""
    since = last_id(sandbox)
    for query in ("watch=", "watch", "watch=yes"):
        status, body = await send(gw, PODS, query)
        doc = assert_status(status, body, 403)
        assert doc["message"] == "no watching pods"
    assert received(sandbox, since) == []
    status, _ = await send(gw, PODS, "watch=0&limit=1")
    assert status == 200
    [record] = received(sandbox, since)
    assert record["acted"]["verb"] == "list" and record["raw_query"] == "limit=1&watch=0"


async def test_semicolons_and_bad_escapes_are_refused(gw, sandbox):
    """Go drops a pair holding `;` or an invalid escape: the gateway would have decided on a pair upstream
    never sees (or the reverse)."""
    since = last_id(sandbox)
    for query in ("watch=0;watch=1", "limit=1&x=%zz", "limit=%", "a=%C3", "watch=fal%C5%BFe"):
        status, body = await send(gw, PODS, query)
        assert_status(status, body, 400)
    assert received(sandbox, since) == []


# ---------------------------------------------------------------------------------------------------------
# exec: the command list
# ---------------------------------------------------------------------------------------------------------


async def test_exec_command_read_differently_is_refused(gw, sandbox):
    """`cat ;x /secret` and `cat %zz /secret` did not match `cat /secret*` for parse_qs, while Go drops the
    middle pair and runs `cat /secret`."""
    since = last_id(sandbox)
    for query in (
        "command=cat&command=;x&command=/secret&stdout=1",
        "command=cat&command=%zz&command=/secret&stdout=1",
        "command=cat&command=/secret&stdout=1&stdout=0",
    ):
        status, _ = await exec_ws(gw, query)
        assert status == 400
    assert received(sandbox, since) == []


async def test_exec_command_blank_elements_are_decided_on(gw, sandbox):
    """parse_qs dropped blank elements (`echo x`); the API server runs `echo "" x`, which the rule denies."""
    since = last_id(sandbox)
    status, _ = await exec_ws(gw, "command=echo&command=&command=x&stdout=1")
    assert status == 403
    status, stdout = await exec_ws(gw, "command=echo&command=%2B&command=x&stdout=1")
    assert (status, stdout) == (101, b"+ x\n")
    [record] = received(sandbox, since)
    assert record["acted"]["command"] == ["echo", "+", "x"]
    assert record["raw_query"] == "command=echo&command=%2B&command=x&stdout=1"


async def test_exec_forwards_the_canonical_query(gw, sandbox):
    """Upstream receives Values.Encode() of what was decided: keys sorted, `+`/`%20` as `+`, upper-case hex."""
    since = last_id(sandbox)
    status, stdout = await exec_ws(gw, "stdout=true&command=echo&command=a%20b+c&command=%c3%a9")
    assert (status, stdout) == (101, "a b c é\n".encode())
    [record] = received(sandbox, since)
    assert record["raw_query"] == "command=echo&command=a+b+c&command=%C3%A9&stdout=true"
    assert record["acted"]["command"] == ["echo", "a b c", "é"]


# ---------------------------------------------------------------------------------------------------------
# fieldSelector names
# ---------------------------------------------------------------------------------------------------------


async def test_field_selector_names_are_read_as_go_reads_them(gw, sandbox):
    """Terms are sorted before the first metadata.name wins (the old reading took `zzz`: allowed, while the
    API server authorized `web`); `\\,` is part of a name."""
    since = last_id(sandbox)
    for selector in (
        "metadata.name%3Dzzz%2Cmetadata.name%3Dweb",
        "metadata.name%3D%3Dweb",
        "metadata.name%3Da%5C%2Cb",
    ):
        status, body = await send(gw, PODS, f"fieldSelector={selector}")
        doc = assert_status(status, body, 403)
        assert doc["message"] == "web is off limits"
    assert received(sandbox, since) == []
    # An invalid escape makes the selector unparseable: no name, and the API server answers 400 itself.
    status, _ = await send(gw, PODS, "fieldSelector=metadata.name%3Dweb%5C")
    [record] = received(sandbox, since)
    assert record["acted"]["name"] == "" and record["acted"]["verb"] == "list"


# ---------------------------------------------------------------------------------------------------------
# methods and paths
# ---------------------------------------------------------------------------------------------------------


def send_raw(gateway: Gateway, method: str, target: str, user_agent: str = "") -> tuple[int, bytes]:
    """http.client sends the method and target exactly as given (aiohttp upper-cases methods)."""
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    url = URL(gateway.url)
    conn = http.client.HTTPSConnection(url.host or "", url.port, context=ctx, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {ALICE}")
        if user_agent:
            conn.putheader("User-Agent", user_agent)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["post", "Get", "OPTIONS", "PROPFIND"])
async def test_methods_the_api_server_does_not_serve_are_refused(gw, sandbox, method):
    """Go's switch on the method is case-sensitive: `post` is no verb at all, not `create`. (Hypercorn's
    HTTP/1.1 parser already refuses a method that is not upper case, with its own plain 400.)"""
    since = last_id(sandbox)
    status, body = send_raw(gw, method, "/k8s/sandbox/api/v1/namespaces/prod/configmaps")
    if not (method != method.upper() and status == 400 and not body.startswith(b"{")):
        assert_status(status, body, 405)
    assert received(sandbox, since) == []


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/prod/pods/../../kube-system/secrets",
        "/api/v1/namespaces/prod/pods/%2e%2e/x",
        "/api/v1/namespaces/prod%2Fpods",
        "/api/v1/namespaces/prod/pods/web%5Cx",
        "/api/v1/namespaces/prod/pods/web%zz",
        "/api/v1/namespaces/prod/pods/web%C3",
        "/api/v1/namespaces/prod/pods/%252e%252e",
    ],
)
async def test_path_escapes_are_refused(gw, sandbox, path):
    since = last_id(sandbox)
    status, body = await send(gw, path)
    assert_status(status, body, 400)
    assert received(sandbox, since) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/nodes/node-1/proxy/exec/prod/web/app?command=sh&stdin=1&tty=1"),
        ("POST", "/api/v1/nodes/node-1/proxy/run/prod/web/app?cmd=cat+/run/secrets/token"),
        ("GET", "/api/v1/nodes/node-1:10250/proxy/attach/prod/web/app?stdout=1"),
        ("GET", "/api/v1/nodes/node-1/proxy/portForward/prod/web?port=5432"),
        ("POST", "/api/v1/nodes/node-1/proxy/checkpoint/prod/web/app"),
        ("GET", "/api/v1/nodes/node-1/proxy/%65xec/prod/web/app?command=sh"),  # the kubelet reads it decoded
        ("GET", "/api/v1/proxy/nodes/node-1/exec/prod/web/app?command=sh"),
    ],
)
async def test_the_kubelets_own_exec_through_nodes_proxy_is_refused(gw, sandbox, method, path):
    """The API server checks only `nodes/proxy` for these and the kubelet runs them (red team, 2026-12-08):
    a shell in a pod past `pods/exec` rules, `commands`, approvals, exec masking and recording."""
    since = last_id(sandbox)
    target, _, query = path.partition("?")
    status, body = await send(gw, target, query, method=method, connection="plain")
    doc = assert_status(status, body, 403)
    assert "through nodes/proxy is refused by the gateway" in doc["message"]
    assert received(sandbox, since) == []
    status, _ = await exec_ws_path(gw, path)
    assert status == 403 and received(sandbox, since) == []


async def test_the_rest_of_nodes_proxy_is_passed_on(gw, sandbox):
    since = last_id(sandbox)
    await send(gw, "/api/v1/nodes/node-1/proxy/metrics", connection="plain")
    assert [r["path"] for r in received(sandbox, since)] == ["/api/v1/nodes/node-1/proxy/metrics"]


async def exec_ws_path(gateway: Gateway, path: str) -> tuple[int, bytes]:
    """A WebSocket upgrade of `path` on the `plain` connection, as a web terminal would open it."""
    url = URL(f"{gateway.url.replace('https://', 'wss://')}/k8s/plain{path}", encoded=True)
    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, protocols=["v5.channel.k8s.io"], ssl=ctx,
                                          headers={"Authorization": f"Bearer {ALICE}"}):  # fmt: skip
                return 101, b""
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, b""


async def test_a_fragment_in_the_target_is_refused_or_cut_before_anyone_reads_it(gw, sandbox):
    """Go keeps a `#` in a request path where URL libraries cut a fragment: the gateway refuses it, or the
    HTTP server has cut it before the gateway read the path (then upstream gets the same cut path)."""
    since = last_id(sandbox)
    status, body = send_raw(gw, "GET", "/k8s/sandbox/api/v1/namespaces/prod/pods/web#x")
    assert status in (400, 403), body
    assert received(sandbox, since) == []
    status, body = send_raw(gw, "GET", "/k8s/sandbox/api/v1/namespaces/prod/pods?watch=0#&watch=1")
    records = received(sandbox, since)
    if status == 200:  # the fragment was cut: `watch=0` was decided on and is all upstream received
        assert [(r["raw_query"], r["acted"]["verb"]) for r in records] == [("watch=0", "list")]
    else:
        assert_status(status, body, 400)
        assert records == []


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [
        ("GET", "/k8s/sandbox/api/v1/namespaces/prod/../kube-system/secrets", 400),
        ("TRACE", "/k8s/sandbox/api/v1/namespaces/prod/pods", 405),
        ("GET", "/k8s/sandbox/api/v1/namespaces/prod/pods?limit=1;watch=1", 400),
    ],
    ids=["path", "method", "query"],
)
async def test_a_request_refused_while_it_is_read_is_audited(gw, sandbox, method, target, code):
    """Refused before authentication, before anyone decided: still one audit event, as every request on a
    connection (a caller cannot probe the gateway's parser without a trace)."""
    user_agent = f"refused-audited-{method}-{code}-{next(COUNTER)}"
    since = last_id(sandbox)
    status, body = send_raw(gw, method, target, user_agent)
    assert_status(status, body, code)
    assert received(sandbox, since) == []
    record = decided(gw, user_agent)
    assert record is not None, "no audit event"
    assert record["status"] == code and record["method"] == method and record["identity"] is None


async def test_a_plus_in_a_path_is_a_plus(gw, sandbox):
    """PathUnescape keeps `+` (unlike a query); `%2B` is the same name."""
    since = last_id(sandbox)
    status, body = await send(gw, "/api/v1/namespaces/prod/configmaps/a%2Bb")
    assert_status(status, body, 404)
    [record] = received(sandbox, since)
    assert record["acted"]["name"] == "a+b"


async def test_proxy_queries_pass_on_unchanged(gw, sandbox):
    """A proxy request's query belongs to the pod: repeated and odd pairs are passed on byte for byte."""
    since = last_id(sandbox)
    query = "a=1&a=2&b=x;y&c=%7e"
    await send(gw, "/api/v1/namespaces/prod/pods/web/proxy/", query)
    records = received(sandbox, since)
    assert records and records[0]["raw_query"] == query


# ---------------------------------------------------------------------------------------------------------
# Property: decided == acted
# ---------------------------------------------------------------------------------------------------------

KEYS = ["watch", "fieldSelector", "labelSelector", "command", "container", "tty", "stdin", "stdout", "limit"]
SPECIALS = [";", "%", "+", "&", "=", "#", "é", "\u017f", "", " ", "\\", ",", "%zz", "%2", "%C3", "%41", "%26"]
SEGMENTS = ["prod", "web", "a%2Bb", "a+b", "%C3%A9", "%zz", "x%", "%41pp", "w:80", "..", "%2e", "@", "we%23b"]
PATHS = [
    "/api/v1/namespaces/{ns}/pods",
    "/api/v1/namespaces/{ns}/pods/{name}",
    "/api/v1/namespaces/{ns}/pods/{name}/exec",
    "/api/v1/namespaces/{ns}/pods/{name}/log",
    "/api/v1/namespaces/{ns}/configmaps",
    "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "/api/v1/watch/namespaces/{ns}/pods",
    "/api/v1/nodes",
    "/api/v1/namespaces/{ns}",
    "/version",
]


def _raw_text(parts: list[str]) -> str:
    # Raw bytes on the wire: ASCII only (other characters percent-encoded), no space.
    text = "".join(parts)
    return "".join(c if c.isascii() and c != " " else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


text_parts = st.lists(st.sampled_from(SPECIALS) | st.text("abwe0lsftrucmdh.-/", max_size=4), max_size=4)
pairs = st.lists(
    st.tuples(st.sampled_from(KEYS) | st.text("abwz", min_size=1, max_size=3), text_parts, st.booleans()),
    max_size=5,
)
WATCHISH = st.sampled_from(["watch=true", "watch=0", "watch=", "watch=false", ""])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    path = draw(st.sampled_from(PATHS)).format(
        ns=draw(st.sampled_from(SEGMENTS)), name=draw(st.sampled_from(SEGMENTS))
    )
    chunks = []
    for key, value, bare in draw(pairs):
        chunks.append(_raw_text([key]) if bare and not value else f"{_raw_text([key])}={_raw_text(value)}")
    extra = draw(WATCHISH)
    if extra:
        chunks.insert(draw(st.integers(0, len(chunks))), extra)
    return path, "&".join(chunks)


def decided(gateway: Gateway, user_agent: str) -> dict[str, Any] | None:
    """What the gateway decided on, from its audit record of the request with this user agent."""
    audit = Path(gateway.config).parent / "audit.jsonl"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in audit.read_text().splitlines() if audit.exists() else []:
            record = json.loads(line)
            if record.get("user_agent") == user_agent and record.get("kind") == "request":
                return record
        time.sleep(0.05)
    return None


COUNTER = iter(range(10**9))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request_parts=requests())
def test_what_the_gateway_decided_is_what_upstream_acts_on(gw, sandbox, request_parts):
    """Either the gateway refuses (a Status, nothing sent upstream) or the sandbox — reading the request like
    the Go API server — acts on the verb, namespace, resource, subresource, name and command decided on."""
    path, query = request_parts
    user_agent = f"parsing-property-{next(COUNTER)}"
    since = last_id(sandbox)
    status, body = asyncio.run(send(gw, path, query, connection="plain", user_agent=user_agent))
    got = [r for r in received(sandbox, since) if r["user_agent"] == user_agent]
    if status in (400, 404, 405) and body and json.loads(body).get("kind") == "Status" and not got:
        event(f"refused {status}")
        return  # refused by the gateway before anything went upstream
    event(f"acted {status}")
    assert len(got) == 1, (status, body, got)
    record = decided(gw, user_agent)
    assert record is not None, "no audit record"
    attrs = record["attributes"]
    command = parse_query(record["query"] or "").get("command", []) if attrs["subresource"] == "exec" else []
    mine = {k: attrs[k] for k in ("verb", "namespace", "resource", "subresource", "name")} | {
        "command": command
    }
    assert got[0]["acted"] == mine, (path, query)
    assert got[0]["raw_query"] == (record["query"] or "")


# ---------------------------------------------------------------------------------------------------------
# the request head: no larger than the API server reads (Go's MaxHeaderBytes 1 MiB), before authentication
# ---------------------------------------------------------------------------------------------------------


async def test_a_head_larger_than_the_api_server_reads_is_refused_before_anyone_decides(gw, sandbox):
    since = last_id(sandbox)
    host, port = URL(gw.url).host, URL(gw.url).port
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    writer.write(f"GET /k8s/sandbox{PODS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n".encode()
                 + b"X-Padding: " + b"p" * (2 << 20) + b"\r\n\r\n")  # fmt: skip
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"content-length"))
    )
    doc = assert_status(int(head.split(b" ")[1]), await reader.readexactly(length), 431)
    assert doc["reason"] == "RequestHeaderFieldsTooLarge"
    writer.transport.abort()
    assert received(sandbox, since) == []


ENDLESS = {
    # Before: 200 MB of one header line, sent without authentication, grew the gateway by 269 MB.
    "head": b"GET /k8s/sandbox/api HTTP/1.1\r\nHost: x\r\nX-Big: ",
    # The same through a chunked body's trailers, which the parser keeps as headers: no token needed.
    "trailer": b"POST /k8s/sandbox/api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ",
}


@pytest.mark.parametrize("where", ENDLESS)
def test_an_endless_head_or_trailer_does_not_grow_the_gateway(gw, where):
    import socket

    import psutil

    before = psutil.Process(gw.process.pid).memory_info().rss
    host, port = URL(gw.url).host, URL(gw.url).port
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    sent = 0
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(ENDLESS[where])
        try:
            while sent < 200 << 20:
                s.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except OSError:  # refused and closed, or dropped (or the socket's buffers full until then)
            pass
    grown = psutil.Process(gw.process.pid).memory_info().rss - before
    assert sent < 100 << 20, sent
    assert grown < 30 << 20, grown
