"""The known-values follower (plugins/masking/known.py `KnownSecrets`) against an HTTP server that answers
list and watch the way the API server does (a `SecretList`, then newline-delimited watch events), with the
failures a real cluster has: a credential without the RBAC, a watch that ends, an ERROR event, a connection
that goes silent, more values than `max_values`. What is promised: the follower says why its values may not
be the cluster's (`problem`), `gate()` refuses with that reason, and it recovers without a busy loop."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.core.errors import StatusError
from kubegate.plugins.masking import known as known_module
from kubegate.plugins.masking.known import KnownSecrets


def secret(name: str, value: str, version: int = 0) -> dict[str, Any]:
    return {"kind": "Secret", "metadata": {"name": name, "namespace": "prod", "resourceVersion": str(version)},
            "data": {"v": base64.b64encode(value.encode()).decode()}}  # fmt: skip


@dataclass
class FakeSecrets:
    """Serves /api/v1/secrets as the API server does: a list in pages of `limit` (its continue token holds
    the snapshot's version), and a watch from a resourceVersion that sends every change after it, then the
    changes as they happen, until `watch_end`: "close" (the response ends after the backlog, as at
    timeoutSeconds), "live" (stays open and sends new changes), "dead" (the backlog, then silence, as over
    a connection that died), "error" (an ERROR 410 event after the backlog, then silence)."""

    url: str = ""
    list_status: int = 200
    watch_status: int = 200
    list_delay: float = 0.0
    list_message: str = ""
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    changes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    version: int = 1
    watch_end: str = "close"
    lists: int = 0  # lists begun (a list of several pages counts once)
    pages: list[dict[str, str]] = field(default_factory=list)
    watches: list[dict[str, str]] = field(default_factory=list)

    def put(self, name: str, value: str) -> None:
        self.version += 1
        kind = "MODIFIED" if name in self.secrets else "ADDED"
        self.secrets[name] = secret(name, value, self.version)
        self.changes.append((self.version, {"type": kind, "object": self.secrets[name]}))

    def delete(self, name: str) -> None:
        self.version += 1
        gone = {**self.secrets.pop(name)}
        gone["metadata"] = {**gone["metadata"], "resourceVersion": str(self.version)}
        self.changes.append((self.version, {"type": "DELETED", "object": gone}))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "1":
            return await self._watch(request)
        self.pages.append(dict(request.query))
        token = request.query.get("continue", "")
        if not token:
            self.lists += 1
        await asyncio.sleep(self.list_delay)
        if self.list_status != 200:
            status = {"kind": "Status", "code": self.list_status, "message": self.list_message}
            return web.json_response(status, status=self.list_status)
        offset, _, version = token.partition(":")
        start, version = int(offset or 0), version or str(self.version)
        limit = int(request.query.get("limit", "0") or 0) or len(self.secrets)
        names = sorted(self.secrets)[start : start + limit]
        meta = {"resourceVersion": version}
        if start + limit < len(self.secrets):
            meta["continue"] = f"{start + limit}:{version}"
        return web.json_response({"kind": "SecretList", "metadata": meta,
                                  "items": [self.secrets[n] for n in names]})  # fmt: skip

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        self.watches.append(dict(request.query))
        if self.watch_status != 200:
            return web.json_response({"kind": "Status", "code": self.watch_status}, status=self.watch_status)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        sent = int(request.query.get("resourceVersion") or 0)

        async def send_backlog() -> None:
            nonlocal sent
            for version, event in [c for c in self.changes if c[0] > sent]:
                await response.write(json.dumps(event).encode() + b"\n")
                sent = version

        await send_backlog()
        if self.watch_end == "error":
            status = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                      "message": "too old resource version"}  # fmt: skip
            await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
        if self.watch_end in ("dead", "error"):
            await asyncio.sleep(3600)
        while self.watch_end == "live":
            await asyncio.sleep(0.01)
            await send_backlog()
        return response


@pytest.fixture
async def api(monkeypatch) -> AsyncIterator[FakeSecrets]:
    # Fast retries, so that each test takes a fraction of a second; the ratios between them are kept.
    monkeypatch.setattr(known_module, "RETRY_SECONDS", 0.2)
    monkeypatch.setattr(known_module, "MIN_WATCH_SECONDS", 0.05)
    state = FakeSecrets()
    app = web.Application()
    app.router.add_get("/api/v1/secrets", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def follow(api: FakeSecrets) -> AsyncIterator[Any]:
    session = aiohttp.ClientSession()
    followers: list[KnownSecrets] = []

    def start(max_values: int = 100, changes: list[set[str]] | None = None) -> KnownSecrets:
        """A follower of `api`; `changes` gets the values learned after each change it reports."""
        upstream = SimpleNamespace(base_url=api.url, session=session, request_options={},
                                   credential_headers=lambda: [("Authorization", "Bearer gateway")])  # fmt: skip
        connection = SimpleNamespace(name="prod", upstream=upstream)
        told: set[str] = set()

        def on_change(added: set[str], removed: set[str]) -> None:
            # What it reports are changes: nothing added twice, nothing removed that was not there.
            assert not added & told and removed <= told
            told.difference_update(removed)
            told.update(added)
            assert told == follower.values()
            if changes is not None:
                changes.append(set(told))

        follower = KnownSecrets(connection, [], 6, max_values, 4096, on_change)  # type: ignore[arg-type]
        follower.start()
        followers.append(follower)
        return follower

    yield start
    for follower in followers:
        await follower.close()
    await session.close()


async def until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition was not met in time")


async def test_a_refused_list_refuses_requests_with_the_reason_and_recovers(api, follow):
    api.list_status = 403
    follower = follow()
    await asyncio.wait_for(follower.ready.wait(), 5)
    assert "listing Secrets answered 403" in (follower.problem or "")
    with pytest.raises(StatusError) as refused:
        await follower.gate()
    assert refused.value.code == 503
    assert (
        "cannot list and watch the Secrets of the cluster with the gateway's credential"
        in refused.value.message
    )
    assert "masking.known_values.on_failure: closed" in refused.value.message

    api.list_status = 200
    api.put("db", "hunter2-password")
    await until(lambda: follower.problem is None)
    await follower.gate()
    assert follower.values() == {"hunter2-password"}


async def test_the_first_request_waits_for_the_first_list(api, follow):
    api.list_delay = 0.3
    api.put("db", "hunter2-password")
    follower = follow()
    await follower.gate()  # neither refused for being early nor let through before the list
    assert follower.lists == 1 and follower.values() == {"hunter2-password"}


async def test_the_list_is_read_in_pages_of_one_snapshot(api, follow):
    for i in range(1_200):
        api.put(f"s{i:04}", f"value-number-{i:04}")
    follower = follow(max_values=2_000)
    await asyncio.wait_for(follower.ready.wait(), 5)
    assert len(follower.values()) == 1_200 and follower.problem is None
    assert [page.get("limit") for page in api.pages] == ["500", "500", "500"]
    assert [page.get("continue", "") for page in api.pages] == [
        "",
        f"500:{api.version}",
        f"1000:{api.version}",
    ]
    await until(lambda: len(api.watches) >= 1)
    assert api.lists == 1 and api.watches[0]["resourceVersion"] == str(api.version)


async def test_a_watch_that_ends_is_watched_again_from_the_last_version(api, follow):
    # client-go's reflector: the end of a watch (its timeoutSeconds) costs a new watch, not a new list.
    api.put("db", "hunter2-password")
    changes: list[set[str]] = []
    follower = follow(changes=changes)
    await asyncio.wait_for(follower.ready.wait(), 5)
    api.put("new", "rotated-password")
    problems = []

    def sampled() -> bool:
        problems.append(follower.problem)
        return len(api.watches) >= 4

    await until(sampled)
    assert problems and all(problem is None for problem in problems)
    assert {"hunter2-password", "rotated-password"} in changes  # the watch's event was applied
    assert api.lists == 1
    assert api.watches[-1]["resourceVersion"] == str(api.version)
    assert all(w["timeoutSeconds"].isdigit() and 300 <= int(w["timeoutSeconds"]) <= 600 for w in api.watches)


async def test_an_error_event_lists_again_even_if_the_server_keeps_the_watch_open(api, follow):
    api.put("db", "hunter2-password")
    api.watch_end = "error"
    follower = follow()
    await until(lambda: follower.lists >= 2)
    assert follower.problem is None


async def test_a_silent_watch_is_taken_for_a_dead_connection(api, follow, monkeypatch):
    monkeypatch.setattr(known_module, "WATCH_SECONDS", (1, 1))
    monkeypatch.setattr(known_module, "WATCH_SILENCE_MARGIN", 0.2)
    api.watch_end = "dead"
    api.put("db", "hunter2-password")
    follower = follow()
    await until(lambda: len(api.watches) >= 1)  # the watch is open, and silent from here on
    api.put("late", "created-while-silent")
    # The server neither ends the watch after timeoutSeconds nor sends anything: the follower watches
    # again from the last version it saw, and gets the change it missed.
    await until(lambda: "created-while-silent" in follower.values(), seconds=10)
    assert follower.problem is None and api.lists == 1
    assert api.watches[0]["timeoutSeconds"] == "1"


async def test_a_refused_watch_is_a_problem_and_no_busy_loop(api, follow):
    api.watch_status = 403
    follower = follow()
    await until(lambda: "watching Secrets answered 403" in (follower.problem or ""))
    await asyncio.sleep(0.5)
    assert follower.lists <= 5  # one list per retry (0.2 s here), not one per loop turn


async def test_more_values_than_max_values_refuses_until_they_fit(api, follow):
    for i in range(5):
        api.put(f"s{i}", f"value-{i}-" + "x" * i)
    api.watch_end = "live"
    follower = follow(max_values=3)
    await asyncio.wait_for(follower.ready.wait(), 5)
    assert "hold 5 distinct values, more than known_values.max_values (3); 2 are not learned" in (
        follower.problem or ""
    )
    assert follower.values() == {"value-2-xx", "value-3-xxx", "value-4-xxxx"}  # the longest
    with pytest.raises(StatusError) as refused:
        await follower.gate()
    assert refused.value.code == 503

    api.delete("s0")
    api.delete("s1")
    await until(lambda: follower.problem is None)  # the watch's two deletions bring five values to three
    await follower.gate()
    assert follower.values() == {"value-2-xx", "value-3-xxx", "value-4-xxxx"}


async def test_a_refused_request_makes_the_follower_look_again_sooner(api, follow, monkeypatch):
    monkeypatch.setattr(known_module, "RETRY_SECONDS", 60.0)  # longer than this test may take
    api.list_status = 403
    follower = follow()
    await asyncio.wait_for(follower.ready.wait(), 5)
    api.list_status = 200  # the RBAC was just granted
    with pytest.raises(StatusError):
        await follower.gate()
    await until(lambda: follower.problem is None)
    await follower.gate()
    assert api.lists == 2


async def test_the_reason_carries_the_api_servers_message(api, follow):
    api.list_status = 403
    api.list_message = 'secrets is forbidden: User "gw" cannot list resource "secrets" in API group ""'
    follower = follow()
    await asyncio.wait_for(follower.ready.wait(), 5)
    assert follower.problem == (
        "cannot list and watch the Secrets of the cluster with the gateway's credential (listing Secrets "
        'answered 403: secrets is forbidden: User "gw" cannot list resource "secrets" in API group "")'
    )


async def test_an_event_longer_than_aiohttps_line_limit_keeps_the_watch(api, follow):
    # aiohttp's line reader refuses lines over 512 KiB: a Secret of 1 MiB used to break the watch (and, as
    # a failure, refuse requests) every time it changed.
    api.watch_end = "live"
    follower = follow()
    await asyncio.wait_for(follower.ready.wait(), 5)
    api.put("big", "b" * (1 << 20))
    api.put("after", "learned-after-the-big-one")
    await until(lambda: "learned-after-the-big-one" in follower.values())
    assert api.lists == 1 and len(api.watches) == 1 and follower.problem is None


async def test_a_burst_of_events_recomputes_the_values_once_per_chunk(api, follow):
    # Recomputing the values costs milliseconds with thousands of them: once per event, a burst of events
    # (a namespace deleted) held the event loop for seconds.
    api.watch_end = "live"
    changes: list[set[str]] = []
    follower = follow(max_values=1_000, changes=changes)
    await until(lambda: len(api.watches) >= 1)
    before = len(changes)
    for i in range(300):  # all at once: the live watch sends them in one write
        api.put(f"burst-{i:03}", f"burst-value-{i:03}")
    await until(lambda: len(follower.values()) == 300)
    assert len(changes) - before < 30


async def test_a_change_reports_only_what_changed(api, follow):
    # With thousands of values, going over all of them for every Secret event held the event loop for
    # milliseconds; the follower now reports what came and went, and nothing for an event that changes no
    # value (a label, an annotation, a value shorter than min_length).
    for i in range(200):
        api.put(f"s{i:03}", f"steady-value-{i:03}")
    api.watch_end = "live"
    changes: list[set[str]] = []
    follower = follow(max_values=1_000, changes=changes)
    reported: list[tuple[set[str], set[str]]] = []
    told = follower.on_change

    def spy(added: set[str], removed: set[str]) -> None:
        reported.append((set(added), set(removed)))
        told(added, removed)

    follower.on_change = spy
    await until(lambda: len(api.watches) >= 1)
    assert len(reported) == 1 and len(reported[0][0]) == 200  # the list
    reported.clear()
    api.put("s007", "rotated-value-007")
    await until(lambda: "rotated-value-007" in follower.values())
    assert reported == [({"rotated-value-007"}, {"steady-value-007"})]
    api.put("s008", "steady-value-008")  # MODIFIED, the same value
    api.put("s009", "short")  # below min_length: steady-value-009 goes, nothing comes
    await until(lambda: "steady-value-009" not in follower.values())
    assert reported[1:] == [(set(), {"steady-value-009"})]
    api.put("copy", "steady-value-010")  # a second Secret holding a value held already
    api.delete("s010")  # one of the two holders goes: the value stays
    api.put("marker", "after-the-copy-went")
    await until(lambda: "after-the-copy-went" in follower.values())
    assert reported[2:] == [({"after-the-copy-went"}, set())] and "steady-value-010" in follower.values()
    assert len(follower.values()) == 200


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),  # which Secret
            st.frozensets(st.sampled_from(["v-one", "v-two", "v-three", "v-four!", "v-five!!"]), max_size=3),
            st.booleans(),  # report the changes after this step
        ),
        max_size=25,
    ),
    st.integers(min_value=1, max_value=6),
)
def test_reported_changes_add_up_to_the_values_held(steps, max_values):
    # Whatever the order of changes and reports, and across max_values both ways: what the follower has
    # reported is exactly `values()`, which is every value some Secret holds (or the longest max_values).
    told: set[str] = set()

    def on_change(added: set[str], removed: set[str]) -> None:
        assert not added & removed and not added & told and removed <= told
        told.difference_update(removed)
        told.update(added)

    follower = KnownSecrets(SimpleNamespace(name="c"), [], 1, max_values, 64, on_change)  # type: ignore[arg-type]
    follower._tried("")  # as if listed: `problem` is then only about max_values
    held: dict[str, frozenset[str]] = {}
    for key, values, report in steps:
        follower._hold(key, values)
        held[key] = values
        if report:
            follower._changed()
            every = set().union(*held.values())
            learned = follower.values()
            assert told == learned <= every
            if len(every) <= max_values:
                assert learned == every and follower.problem is None
            else:
                assert len(learned) == max_values
                assert min(map(len, learned)) >= max(map(len, every - learned))
                assert f"{len(every) - max_values} are not learned" in (follower.problem or "")


class Chunks:
    """An aiohttp StreamReader's `iter_any`, over given chunks."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=6).map(lambda b: b.replace(b"\n", b"")), max_size=8),
    st.lists(st.integers(min_value=0, max_value=80), max_size=10),
    st.booleans(),
)
def test_line_batches_split_as_lines_whatever_the_chunks(lines, cuts, trailing_newline):
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    async def read() -> list[bytes]:
        return [
            line for batch in [b async for b in known_module._line_batches(Chunks(chunks))] for line in batch
        ]

    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert asyncio.run(read()) == expected
