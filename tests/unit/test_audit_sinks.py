"""What every audit sink records of caller-chosen text (cut to a bound, with its length and hash), and how
audit-webhook delivers what its receiver refuses: a real aiohttp receiver (its default body limit, 1 MiB),
the spool on disk, dead letters and the readiness they report."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from aiohttp import web

from kubegate.core import observe
from kubegate.core.flow import AuditEvent
from kubegate.plugins.audit import chain, webhook
from kubegate.plugins.audit.file import AuditFileSettings, FileSink, stored_from_files
from kubegate.plugins.audit.sink import FIELD_MAX_CHARS, make_record
from kubegate.plugins.audit.webhook import AuditWebhookSettings, Spool, WebhookSink


def event(number: int, **data: object) -> AuditEvent:
    return AuditEvent(kind="request", flow_id=f"r{number}", connection="prod", time=1000.0 + number,
                      data={"identity": {"user": "alice"}, "status": 200, "n": number, **data})  # fmt: skip


# -- caller-chosen text is bounded, the same in every sink --------------------------------------------------


def test_caller_chosen_text_is_cut_with_its_length_and_hash():
    """A 401 is recorded with the path, query and User-Agent a client without a token sent (a head may be
    1 MiB): each such field is cut to FIELD_MAX_CHARS, with its length and SHA-256 kept."""
    agent, name = "\xff" * 300_000, "n" * 9000
    data = {"user_agent": agent, "path": "/api/v1/namespaces/x/pods/" + name, "query": "q=" + "a" * 5000,
            "attributes": {"verb": "get", "name": name, "namespace": "x"}, "kubectl_command": "get pods",
            "decision": {"verdict": "deny", "reason": "r" * 5000, "rule": "a-rule"}, "status": 401}  # fmt: skip
    original = json.loads(json.dumps(data))
    record = make_record(AuditEvent(kind="request", flow_id="r", connection="prod", time=1.0, data=data))
    kept = record["data"]
    assert data == original  # the event other hooks read is not changed
    assert len(kept["user_agent"]) == FIELD_MAX_CHARS and agent.startswith(kept["user_agent"])
    assert len(kept["attributes"]["name"]) == FIELD_MAX_CHARS and len(kept["path"]) == FIELD_MAX_CHARS
    assert kept["truncated"]["user_agent"] == {
        "length": 300_000,
        "sha256": hashlib.sha256(agent.encode()).hexdigest(),
    }
    assert sorted(kept["truncated"]) == [
        "attributes.name", "decision.reason", "path", "query", "user_agent"]  # fmt: skip
    assert kept["kubectl_command"] == "get pods" and kept["decision"]["rule"] == "a-rule"
    assert len(chain.canonical(record)) < 64 * 1024
    short = event(1, user_agent="kubectl/v1.31.0")
    assert make_record(short)["data"] is short.data  # nothing to cut: no copy


def test_the_audit_file_chains_the_cut_record(tmp_path):
    """The cut happens before the record is chained: the file holds the bounded record and verifies."""
    path = tmp_path / "audit.jsonl"

    async def run() -> None:
        sink = FileSink(AuditFileSettings(path=path, linger_ms=0), path, None)
        sink.start()
        await sink.submit(event(1, user_agent="\xff" * 300_000))
        await sink.close()

    asyncio.run(run())
    line = path.read_bytes()
    assert len(line) < 3 * FIELD_MAX_CHARS
    assert json.loads(line)["record"]["data"]["truncated"]["user_agent"]["length"] == 300_000
    assert chain.verify(stored_from_files([path])) == (1, None)


# -- audit-webhook ---------------------------------------------------------------------------------------


def test_the_spool_is_utf8_one_line_per_event(tmp_path):
    """Spooled and POSTed as UTF-8: `\\u00ff` escapes made each byte 0xFF of a User-Agent six bytes (a 1 MiB
    head, 6 MB of JSON). A line separator inside a value (U+2028, U+0085) does not split the event."""
    spool = Spool(tmp_path / "spool", 1 << 30)
    spool.append([{"id": "a", "data": {"user_agent": "\xff" * 1000, "note": "one\u2028two\x85three"}}])
    assert spool.size() < 2100  # two bytes each in UTF-8; six escaped
    with open(spool.segments()[-1], "ab") as out:
        out.write('{"id":"cut short by a crash","ua":"\xff'.encode()[:-1])  # inside a character
    found = spool.oldest()
    assert found is not None and [json.loads(line)["id"] for line in found[1]] == ["a"]


class Receiver:
    """An aiohttp receiver (client_max_size 1 MiB, as by default) whose answer a test chooses."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.answer: Callable[[list[dict]], int] = lambda events: 200

    async def take(self, request: web.Request) -> web.Response:
        events = (await request.json())["events"]
        status = self.answer(events)
        if status == 200:
            self.events.extend(events)
        return web.Response(status=status)

    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    taker = Receiver()
    app = web.Application()
    app.router.add_post("/", taker.take)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield taker, f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def settled(check: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds * 20)):
        if check():
            return
        await asyncio.sleep(0.05)


def readiness(sink: WebhookSink) -> str | None:
    return webhook.PLUGIN.kubegate_readiness(SimpleNamespace(state={"audit-webhook": sink}))  # type: ignore[arg-type]


async def test_an_unauthenticated_huge_user_agent_does_not_stop_delivery(receiver, tmp_path):
    """A 401's record with a 300 KB User-Agent of 0xFF was 1.8 MB of JSON: the receiver refused it (413) on
    every retry and no later event of anyone was delivered, the sink still healthy (red team). Now it is
    delivered, cut, and so is what follows."""
    taker, url = receiver
    sink = WebhookSink(AuditWebhookSettings(url=url, retry_seconds=0.05, linger_ms=0), tmp_path / "spool")
    sink.start()
    big = event(1, user_agent="\xff" * 300_000, status=401, identity=None)
    later = event(2)
    await sink.submit(big)
    await sink.submit(later)
    await settled(lambda: later.id in taker.ids())
    await sink.close(1)
    assert taker.ids() == [big.id, later.id]
    assert taker.events[0]["data"]["truncated"]["user_agent"]["length"] == 300_000


async def test_a_burst_of_long_events_fits_a_small_spool_batch_by_batch(receiver, tmp_path):
    """A batch goes into the spool whole: 500 events with three 4,096-character fields of bytes 0x80-0xFF
    (8 KB each in UTF-8) were one batch of 12 MB, larger than a 1 MiB spool, refused as 'the spool is full'
    on every retry while the spool was empty — the sink failed for good (fail-closed: 503 for everyone).
    Now a batch takes at most an eighth of the spool by estimate, and every event is delivered."""
    taker, url = receiver
    sink = WebhookSink(
        AuditWebhookSettings(url=url, retry_seconds=0.05, max_spool_bytes=1 << 20), tmp_path / "spool"
    )
    sink.start()
    long = "\x80" * 5000
    burst = [event(n, user_agent=long, kubectl_command=long, kubectl_session=long) for n in range(300)]
    for e in burst:  # fail-open: nothing waits, so all are queued before the writer takes its first batch
        await sink.submit(e)
    await settled(lambda: len(taker.events) == len(burst), seconds=60)
    await sink.close(1)
    assert taker.ids() == [e.id for e in burst]
    assert sink.last_error == ""


async def test_an_event_the_receiver_refuses_goes_to_dead_letters_and_delivery_goes_on(receiver, tmp_path):
    """A receiver that refuses one event (a WAF's 403, a 400 or 413 for what it holds) refused its batch on
    every retry, and nothing after it was delivered. Now the batch is sent again one event per request; the
    event refused alone is kept in the dead-letter file, counted, and a fail-closed sink reports it as not
    ready (requests go on) until an operator moves the file away. A receiver that refuses everything (a wrong
    token) sends nothing there: the events wait in the spool until it takes them."""
    taker, url = receiver
    settings = AuditWebhookSettings(
        url=url, retry_seconds=0.05, linger_ms=0, post_batch=10, on_failure="closed"
    )
    spool = tmp_path / "spool"
    sink = WebhookSink(settings, spool)
    taker.answer = lambda events: 403  # everything, for a while
    sink.start()
    events = [event(n, user_agent="<script>" if n == 3 else "kubectl") for n in range(6)]
    for item in events:
        await sink.submit(item)
    await asyncio.sleep(0.5)
    assert taker.ids() == [] and not list(spool.glob("dead-letter*")) and readiness(sink) is None
    taker.answer = lambda events: (
        403 if any(e["data"].get("user_agent") == "<script>" for e in events) else 200
    )
    await settled(lambda: len(taker.ids()) == 5)
    assert taker.ids() == [e.id for e in events if e.data["user_agent"] != "<script>"]
    dead = (spool / "dead-letter.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in dead] == [events[3].id]
    assert sink.dead_lettered == 1 and sink.healthy
    observe.publish_sink_gauges(SimpleNamespace(extensions={"audit-webhook": sink}))  # type: ignore[arg-type]
    assert (
        observe.REGISTRY.get_sample_value("kubegate_audit_dead_letter_events", {"sink": "audit-webhook"}) == 1
    )
    sink.gate()  # requests go on: the event is kept
    problem = readiness(sink)
    assert (
        problem is not None
        and "refused audit events" in problem
        and str(spool / "dead-letter.jsonl") in problem
    )
    after = event(9)
    await sink.submit(after)
    await settled(lambda: after.id in taker.ids())
    assert after.id in taker.ids()
    (spool / "dead-letter.jsonl").rename(tmp_path / "looked-at.jsonl")  # what the operator does
    assert readiness(sink) is None
    await sink.close(1)
