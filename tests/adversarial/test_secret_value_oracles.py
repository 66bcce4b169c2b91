"""A masked Secret value read back out through a write (issue 13 §3): a caller who may patch a Secret but sees
its values masked copies a value into an annotation (or `type`) and reads it there, or uses JSON patch's
`test` as an oracle for guesses. On the masked connection each is refused before it reaches the cluster; on
the unmasked connection (the control) the same patch goes through, so each check here can fail."""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Iterator

import aiohttp
import pytest
from conftest import GATEWAY_USERS, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl
from yarl import URL

from kubegate.plugins.masking.writes import reading_op

ALICE = GATEWAY_USERS["alice"][1]
NS = "dev"
NAME = f"oracle-{int(time.time())}"
VALUE = "s3cr"  # short: below the value learner's minimum, so only structure masks it
JSON_PATCH = "application/json-patch+json"


@pytest.fixture(scope="module")
def gw(sandbox, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-oracles")
    config = gateway_config(sandbox, directory, free_port())
    plain = config["connections"]["sandbox"]
    tokens = plain["plugins"]["static-tokens"]
    config["connections"]["masked"] = {
        "upstream": dict(plain["upstream"]),
        "plugins": {"static-tokens": tokens, "masking": {"exempt": {"users": ["ci-bot"]}}},
    }
    run_kubectl(sandbox.kubeconfig, "create", "secret", "generic", NAME, "-n", NS,
                f"--from-literal=password={VALUE}", check=True)  # fmt: skip
    gateway = start_gateway(directory, config)
    yield gateway
    stop_process(gateway.process)


async def patch(gw: Gateway, connection: str, ops: list | bytes, token: str = ALICE) -> tuple[int, dict]:
    body = ops if isinstance(ops, bytes) else json.dumps(ops).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": JSON_PATCH}
    url = URL(f"{gw.connection_url(connection)}/api/v1/namespaces/{NS}/secrets/{NAME}", encoded=True)
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.patch(url, data=body, headers=headers, ssl=ctx) as resp:
            return resp.status, json.loads(await resp.read())


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


ENCODED = base64.b64encode(VALUE.encode()).decode()
READING = [
    [{"op": "copy", "from": "/data/password", "path": "/metadata/annotations/leak"}],
    [{"op": "move", "from": "/data/password", "path": "/type"}],
    [{"op": "copy", "from": "/data", "path": "/metadata/annotations"}],
    [{"op": "test", "path": "/data/password", "value": ENCODED}],
    [{"op": "add", "path": "/metadata/labels", "value": {}}, {"op": "test", "path": "/data", "value": {}}],
]


@pytest.mark.parametrize(
    "ops", READING, ids=lambda ops: f"{ops[-1]['op']}:{ops[-1].get('from', ops[-1]['path'])}"
)
async def test_a_patch_that_reads_a_masked_value_is_refused(gw, sandbox, ops):
    since = last_id(sandbox)
    status, body = await patch(gw, "masked", ops)
    assert status == 403 and body["kind"] == "Status", body
    assert body["message"].startswith("masking: ")
    assert not [r for r in sandbox.requests_log(since) if r["method"] == "PATCH"]


# The API server's JSON patch library (gopkg.in/evanphx/json-patch.v4) drops a pointer's first segment
# whatever it is: `x/data/password` is /data/password there. The gateway refuses such pointers (and the empty
# one) with 400 before masking or any rule judges them, on every connection.
NOT_RFC_6901 = [
    [{"op": "copy", "from": "x/data/password", "path": "/metadata/annotations/leak"}],
    [{"op": "move", "from": "data/password", "path": "/type"}],
    [{"op": "test", "path": "x/data/password", "value": ENCODED}],
    [{"op": "copy", "from": "", "path": "/metadata/annotations/all"}],
]


@pytest.mark.parametrize("connection", ["masked", "sandbox"])
@pytest.mark.parametrize(
    "ops", NOT_RFC_6901, ids=lambda ops: f"{ops[-1]['op']}:{ops[-1].get('from', ops[-1]['path'])}"
)
async def test_a_pointer_the_api_server_reads_otherwise_is_refused_before_masking(
    gw, sandbox, ops, connection
):
    since = last_id(sandbox)
    status, body = await patch(gw, connection, ops)
    assert status == 400 and body["kind"] == "Status" and body["message"].startswith("the JSON patch's"), body
    assert not [r for r in sandbox.requests_log(since) if r["method"] == "PATCH"]


async def test_the_same_patch_goes_through_unmasked_and_for_an_exempt_caller(gw, sandbox):
    """The control: without masking (or for a caller exempt from it) the copy happens and shows the value."""
    ops = [
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {"op": "copy", "from": "/data/password", "path": "/metadata/annotations/copied"},
    ]
    status, body = await patch(gw, "sandbox", ops)
    assert status == 200 and body["metadata"]["annotations"]["copied"] == ENCODED
    status, body = await patch(gw, "masked", [{"op": "test", "path": "/data/password", "value": ENCODED}],
                               token=GATEWAY_USERS["ci-bot"][1])  # fmt: skip
    assert status == 200, body  # an exempt caller sees values anyway: nothing to hide from them


async def test_patches_that_read_nothing_still_work_and_unreadable_ones_are_refused(gw):
    status, body = await patch(gw, "masked", [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])
    assert status == 200, body
    status, body = await patch(
        gw, "masked", b'[{"op":"copy","from":"/data/password","from":"/type","path":"/x"}]'
    )
    assert status == 403 and "cannot be read" in body["message"]


def test_reading_op():
    assert reading_op([{"op": "copy", "from": "/metadata/name", "path": "/metadata/annotations/a"}]) is None
    assert reading_op([{"op": "replace", "path": "/data/password", "value": "eA=="}]) is None  # a write only
    assert reading_op([{"op": "copy", "from": "/data/x", "path": "/data/y"}])  # between values: still refused
    assert reading_op([{"op": "copy", "from": "/database", "path": "/a"}]) is None  # not /data
    assert reading_op([{"op": "move", "from": None, "path": "/a"}])
    assert reading_op({"op": "copy"}) and reading_op(["copy"])


MARKER_B64 = base64.b64encode(b"<masked by kubegate>").decode()


def test_a_masked_copy_written_back_is_refused_not_stored(gw, sandbox, tmp_path):
    """`kubectl get -o yaml` then `kubectl replace -f` through a masked connection would store the marker in
    place of the real value: refused, and the Secret keeps its value."""
    kubeconfig = gw.kubeconfig("alice", connection="masked")
    shown = run_kubectl(kubeconfig, "get", "secret", NAME, "-n", NS, "-o", "json", check=True).stdout
    assert json.loads(shown)["data"]["password"] == MARKER_B64
    (tmp_path / "secret.json").write_text(shown)
    replaced = run_kubectl(kubeconfig, "replace", "-f", str(tmp_path / "secret.json"))
    assert replaced.returncode != 0 and "masking marker" in replaced.stderr, replaced.stderr
    stored = run_kubectl(sandbox.kubeconfig, "get", "secret", NAME, "-n", NS, "-o", "json", check=True).stdout
    assert json.loads(stored)["data"]["password"] == ENCODED
    # A write of real values still works, and so does a JSON patch that sets one.
    fresh = json.loads(shown) | {"data": {"password": ENCODED}}
    (tmp_path / "fresh.json").write_text(json.dumps(fresh))
    assert run_kubectl(kubeconfig, "replace", "-f", str(tmp_path / "fresh.json")).returncode == 0


async def test_json_and_merge_patches_writing_the_marker_are_refused(gw):
    status, body = await patch(
        gw, "masked", [{"op": "replace", "path": "/data/password", "value": MARKER_B64}]
    )
    assert status == 403 and "masking marker" in body["message"]
    status, body = await patch(gw, "masked", [{"op": "add", "path": "/data", "value": {"p": MARKER_B64}}])
    assert status == 403 and "masking marker" in body["message"]
    status, body = await patch(gw, "masked", [{"op": "replace", "path": "/data/password", "value": ENCODED}])
    assert status == 200, body
