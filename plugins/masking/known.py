"""Known secret values: the gateway lists and watches the cluster's Secrets with its own credential and
masks exact occurrences of their values in text and bodies — as CI systems mask registered secrets.

A value is known from the moment the watch event that carries it arrives (a watch that ends is watched again
from the last version seen; a list follows an ERROR event). Memory is bounded: at most `max_values` values of
at most `max_value_bytes` bytes each, of at least `min_length` characters (shorter ones would mask common
words); more values than that is a `problem`, which refuses requests where `on_failure` is closed. Binary
values (not UTF-8: a keystore, a DER key) are learned too, as their bytes decoded with `surrogateescape` — the
way text output is read (`TextMasker.mask_bytes`) — so their raw bytes in logs or exec output are masked, and
their base64 and URL-encoded forms anywhere. Secret objects themselves are masked by structure, whatever their
values' size or bytes (`objects.py`); this is for the same values showing up elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from kubegate.core.errors import StatusError

from . import scanner
from .forms import FormSet, KnownForms
from .text import value_forms

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection

log = logging.getLogger("kubegate.masking")
RETRY_SECONDS = 5.0
RETRY_SOONEST = 1.0
# How long a request waits, at start, for the first list of the Secrets (on_failure: closed).
FIRST_LIST_SECONDS = 10.0
# A watch asks the API server to end it after a random 5-10 minutes, as client-go's reflector does; a
# watch that has sent nothing for that long plus this margin is taken for a dead connection and watched
# again (without it, a connection that died silently would leave the values stale for good).
WATCH_SECONDS = (300, 600)
WATCH_SILENCE_MARGIN = 60.0
# The longest watch event read (etcd keeps objects up to 1.5 MiB; the event adds little to its Secret).
MAX_EVENT_BYTES = 16 << 20
# Secrets per list request (client-go's reflector lists 500 at a time too).
LIST_PAGE = 500
# A watch that ends sooner than this after it began is watched again only after this long (no busy loop).
MIN_WATCH_SECONDS = 1.0


class KnownSecrets:
    """Follows the Secrets of `namespaces` (all when empty) as client-go's reflector does (`_follow`).
    `problem` says, in one line, why the values it holds may not be the cluster's (not listed yet, a list
    or watch that failed, more values than `max_values`); None while they are."""

    def __init__(self, connection: Connection, namespaces: list[str], min_length: int, max_values: int,
                 max_value_bytes: int, on_change: Callable[[set[str], set[str]], None]):  # fmt: skip
        """`on_change(added, removed)`: the values learned changed (called on the event loop)."""
        self.connection = connection
        self.namespaces = namespaces or [""]
        self.min_length, self.max_values, self.max_value_bytes = min_length, max_values, max_value_bytes
        self.on_change = on_change
        self.by_secret: dict[str, frozenset[str]] = {}  # namespace/name -> its values (none: absent)
        # How many Secrets hold each value, and the values that came and went since `_changed` last ran:
        # a change costs what it changes, not a pass over every value known (9,000 values: 2-9 ms a chunk).
        self._holders: dict[str, int] = {}
        self._came: set[str] = set()
        self._went: set[str] = set()
        self._learned: set[str] = set()  # what on_change was told, in all
        # Set once every namespace was tried (listed, or failed) at least once.
        self.ready = asyncio.Event()
        self.lists = 0  # successful lists (tests and diagnostics)
        self._failed: dict[str, str] = {}  # namespace -> why its last list (or watch) failed
        self._unlisted: set[str] = set(self.namespaces)
        self._over: int = 0  # distinct values found beyond max_values (not learned)
        self._tasks: list[asyncio.Task[None]] = []
        # Set by a refused request to try again before RETRY_SECONDS are up (at most every RETRY_SOONEST).
        self._retry_now = asyncio.Event()
        self._retry_asked = 0.0

    @property
    def healthy(self) -> bool:
        """`problem` is None (cheaper: asked on every request)."""
        return not (self._failed or self._unlisted or self._over)

    @property
    def problem(self) -> str | None:
        if self._failed:
            namespace, why = next(iter(self._failed.items()))
            scope = f"namespace {namespace}" if namespace else "the cluster"
            return f"cannot list and watch the Secrets of {scope} with the gateway's credential ({why})"
        if self._unlisted:
            return f"the Secrets of {self._where} are not listed yet"
        if self._over:
            return self._over_message()
        return None

    @property
    def _where(self) -> str:
        return "the cluster" if self.namespaces == [""] else "namespaces " + ", ".join(self.namespaces)

    def _over_message(self) -> str:
        return (
            f"the Secrets of {self._where} hold {self.max_values + self._over} distinct values, more than "
            f"known_values.max_values ({self.max_values}); {self._over} are not learned"
        )

    async def gate(self) -> None:
        """Refuse a request (503) while `problem` says the values may not be the cluster's; at start, wait
        up to FIRST_LIST_SECONDS for the first list first (a request does not fail only for being early)."""
        if self.healthy:
            return
        if not self.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), FIRST_LIST_SECONDS)
        problem = self.problem
        if problem is not None:
            now = asyncio.get_running_loop().time()
            if self._failed and now - self._retry_asked >= RETRY_SOONEST:
                # The cause may be gone (an agent that reconnected, RBAC just granted): look now.
                self._retry_asked = now
                self._retry_now.set()
            raise StatusError(
                503,
                f"masking on connection {self.connection.name} cannot mask the cluster's Secret values: "
                f"{problem}; requests are refused until it can (masking.known_values.on_failure: closed)",
            )

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(ns)) for ns in self.namespaces]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def values(self) -> set[str]:
        """The values learned: every value held, or the `max_values` longest of them (a short value is the
        likeliest to be ordinary text as well)."""
        if len(self._holders) <= self.max_values:
            return set(self._holders)
        return set(sorted(self._holders, key=len, reverse=True)[: self.max_values])

    def _hold(self, key: str, values: frozenset[str]) -> bool:
        """The Secret `key` now holds `values` (none: deleted); whether the values held changed."""
        old = self.by_secret.get(key, frozenset())
        if values == old:
            return False
        if values:
            self.by_secret[key] = values
        else:
            self.by_secret.pop(key, None)
        holders, came, went = self._holders, self._came, self._went
        for value in old - values:
            if holders[value] > 1:
                holders[value] -= 1
                continue
            del holders[value]
            if value in came:
                came.discard(value)
            else:
                went.add(value)
        for value in values - old:
            if value in holders:
                holders[value] += 1
                continue
            holders[value] = 1
            if value in went:
                went.discard(value)
            else:
                came.add(value)
        return True

    def _extract(self, secret: dict[str, Any]) -> frozenset[str]:
        found: set[str] = set()
        data = secret.get("data")
        for encoded in data.values() if isinstance(data, dict) else ():
            try:
                raw = base64.b64decode(encoded or "", validate=True)
            except (ValueError, TypeError):
                continue  # not base64: the API server never sends that
            self._add(found, raw)
        string_data = secret.get("stringData")
        for value in string_data.values() if isinstance(string_data, dict) else ():
            if isinstance(value, str):
                self._add(found, value.encode("utf-8", "surrogateescape"))
        return frozenset(found)

    def _add(self, found: set[str], raw: bytes) -> None:
        raw = raw.strip(b" \t\r\n")  # `echo pw > file` leaves a newline the output will not show with it
        value = raw.decode("utf-8", "surrogateescape")  # binary bytes become lone surrogates, as in output
        if len(value) >= self.min_length and len(raw) <= self.max_value_bytes:
            found.add(value)

    def _key(self, secret: dict[str, Any]) -> str:
        meta = secret.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _changed(self) -> None:
        """Tell `on_change` what came and went since the last call."""
        was_over = self._over
        self._over = max(0, len(self._holders) - self.max_values)
        if self._over or was_over:  # which values are learned depends on all of them (`values`)
            learned = self.values()
            added, removed = learned - self._learned, self._learned - learned
            self._learned = learned
        else:
            added, removed = self._came, self._went
            self._learned |= added
            self._learned -= removed
        self._came, self._went = set(), set()
        if added or removed:
            self.on_change(added, removed)
        if self._over and not was_over:
            log.error("masking on %s: %s", self.connection.name, self._over_message())

    def _url(self, namespace: str) -> str:
        base = self.connection.upstream.base_url
        return f"{base}/api/v1/namespaces/{namespace}/secrets" if namespace else f"{base}/api/v1/secrets"

    async def _follow(self, namespace: str) -> None:
        """client-go's reflector, for one namespace: list (in pages), then watch from the list's version;
        a watch that ends (its timeoutSeconds, a broken or silent connection) is watched again from the last
        version seen, and only an ERROR event (410 Gone: the version is too old) costs a new list."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                version: str | None = await self._list(namespace)
                if self._failed.pop(namespace, None) is not None:
                    log.warning("masking on %s: follows the Secrets again", self.connection.name)
                self._tried(namespace)
                while version is not None:
                    began = loop.time()
                    try:
                        version = await self._watch(namespace, version)
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        # A broken or silent connection, a line that is not JSON: watch again from the
                        # last version seen; the values held stay in force meanwhile.
                        log.info("masking on %s: the Secrets' watch ended (%s); watching again",
                                 self.connection.name, _one_line(exc))  # fmt: skip
                    if loop.time() - began < MIN_WATCH_SECONDS:
                        await asyncio.sleep(MIN_WATCH_SECONDS)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the gateway may lack the RBAC, or the API server is down: retry
                first = namespace not in self._failed
                self._failed[namespace] = _one_line(exc)
                self._tried(namespace)
                if first:
                    log.warning("masking on %s: %s; retrying every %g s", self.connection.name, self.problem,
                                RETRY_SECONDS)  # fmt: skip
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), RETRY_SECONDS)

    def _tried(self, namespace: str) -> None:
        self._unlisted.discard(namespace)
        if not self._unlisted:
            self.ready.set()

    async def _list(self, namespace: str) -> str:
        """List the namespace's Secrets, LIST_PAGE at a time (one consistent snapshot: the API server's
        continue token carries its version), and hold their values; the list's resourceVersion. Pages keep
        each parse short: the event loop serves requests between them."""
        upstream = self.connection.upstream
        headers = [*upstream.credential_headers(), ("Accept", "application/json")]
        fresh: dict[str, frozenset[str]] = {}
        token = ""
        while True:
            params = {"limit": str(LIST_PAGE), **({"continue": token} if token else {})}
            async with upstream.session.get(self._url(namespace), headers=headers, params=params,
                                            **upstream.request_options) as response:  # fmt: skip
                if response.status != 200:
                    raise RuntimeError(
                        f"listing Secrets answered {response.status}{await _status_message(response)}"
                    )
                listing = json.loads(await response.read())
            if not isinstance(listing, dict) or not isinstance(listing.get("items") or [], list):
                raise RuntimeError("listing Secrets answered something that is not a list")
            for item in listing.get("items") or []:
                if isinstance(item, dict):
                    fresh[self._key(item)] = self._extract(item)
            meta: dict[str, Any] = listing["metadata"] if isinstance(listing.get("metadata"), dict) else {}
            token = str(meta.get("continue") or "")
            if not token:
                break
        for key in [k for k in self.by_secret if _in(k, namespace) and k not in fresh]:
            self._hold(key, frozenset())
        for key, values in fresh.items():
            self._hold(key, values)
        self.lists += 1
        self._changed()
        return str(meta.get("resourceVersion", ""))

    async def _watch(self, namespace: str, version: str) -> str | None:
        """Apply the Secrets' changes from `version` until the watch ends; the last version seen, to watch
        again from, or None after an ERROR event (410 Gone for a version too old: list again). RuntimeError for
        an error status: not caught by `_follow`'s watch-again path, so it backs off instead of looping."""
        upstream = self.connection.upstream
        headers = [*upstream.credential_headers(), ("Accept", "application/json")]
        seconds = random.randint(*WATCH_SECONDS)
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(seconds)}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=None, sock_read=seconds + WATCH_SILENCE_MARGIN)
        async with upstream.session.get(self._url(namespace), headers=headers, params=params, timeout=timeout,
                                        **upstream.request_options) as response:  # fmt: skip
            if response.status != 200:
                raise RuntimeError(
                    f"watching Secrets answered {response.status}{await _status_message(response)}"
                )
            # One recomputation of the values per chunk read, not per event: a burst of events (a namespace
            # deleted, many Helm releases) arrives in few chunks, and the events of one chunk are applied
            # in one turn of the event loop anyway, so no request sees the values in between.
            async for lines in _line_batches(response.content):
                changed = False
                try:
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind = event.get("type") if isinstance(event, dict) else None
                        secret = event.get("object") if isinstance(event, dict) else None
                        if kind == "ERROR":
                            return None  # the API server ends the watch after it: list again
                        if not isinstance(secret, dict):
                            continue
                        meta = secret.get("metadata")
                        seen = meta.get("resourceVersion") if isinstance(meta, dict) else None
                        if isinstance(seen, str) and seen:
                            version = seen  # BOOKMARK events carry only this
                        if kind in ("ADDED", "MODIFIED"):
                            changed |= self._hold(self._key(secret), self._extract(secret))
                        elif kind == "DELETED":
                            changed |= self._hold(self._key(secret), frozenset())
                finally:
                    if changed:
                        self._changed()
        return version


async def _line_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The watch's lines, a list per chunk read, however long a line (up to MAX_EVENT_BYTES): aiohttp's own
    line reader refuses lines over twice its read buffer (512 KiB), and a Secret's event is as large as the
    Secret (up to about 1.5 MB). ValueError past the bound."""
    buffer = bytearray()
    searched = 0  # buffer[:searched] holds no newline
    async for chunk in content.iter_any():
        buffer += chunk
        lines, start = [], 0
        while (end := buffer.find(b"\n", max(start, searched))) >= 0:
            lines.append(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]  # once per chunk: a chunk of many lines is not shifted once per line
        searched = len(buffer)
        if lines:
            yield lines
        if searched > MAX_EVENT_BYTES:
            raise ValueError(f"a watch event longer than {MAX_EVENT_BYTES} bytes")
    if buffer:
        yield [bytes(buffer)]


async def _status_message(response: aiohttp.ClientResponse) -> str:
    """ ": " and the message of the `Status` an error answer carries (the API server's RBAC denial names the
    user and the verb it lacks), at most 300 characters; "" when it has none."""
    try:
        status = json.loads(await response.content.read(64 * 1024))
        message = status.get("message") if isinstance(status, dict) else None
    except Exception:
        return ""
    if not isinstance(message, str) or not message.strip():
        return ""
    line = message.strip().splitlines()[0]
    return f": {line[:300]}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return (
        text if isinstance(exc, RuntimeError) and text else f"{exc.__class__.__name__}: {text}".rstrip(": ")
    )


def _in(key: str, namespace: str) -> bool:
    return not namespace or key.startswith(f"{namespace}/")


def text_values(values: Iterable[str]) -> tuple[set[str], set[str]]:
    """Known values as `TextMasker` takes them, and the binary ones it cannot take.

    A value with characters JSON escapes (a quote, a backslash, a newline of a PEM key) is also given in
    its escaped form, since the value pass runs over serialized JSON text; a multi-line one also as a
    terminal prints it (CR LF) and as a terminal sends it (bare CR). A binary value is given as its
    base64 forms (standard and URL-safe, padded or not) and URL-encoding. The second set holds the forms
    searched only as they are (`value_forms` does not encode them): a binary value's raw form, which it
    cannot encode, and a multi-line value's bare-CR form."""
    plain: set[str] = set()
    binary: set[str] = set()
    as_is: set[str] = set()
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            binary.add(value)
            continue
        # A terminal (tty: true, kubectl exec -t, a tty container's log) writes each newline as CR LF (the
        # line discipline's onlcr): a multi-line value (a PEM key) comes out in that form.
        for form in (value, value.replace("\n", "\r\n")) if "\n" in value else (value,):
            plain.add(form)
            escaped = orjson.dumps(form)[1:-1].decode()
            if escaped != form:
                plain.add(escaped)
        if "\n" in value:
            # ... and a terminal sends a paste's newlines (and Enter) as CR: a key pasted into
            # `kubectl exec -it` reaches stdin, and a recording's typed input, in that form. Only typed input
            # holds it, never encoded: the one form, not its JSON, base64 or URL forms.
            as_is.add(value.replace("\n", "\r"))
    for value in binary:
        raw = value.encode("utf-8", "surrogateescape")
        forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
        plain |= forms | {form.rstrip("=") for form in forms} | {quote(raw, safe="")}
    return plain, binary | as_is


def forms_of(values: Iterable[str]) -> set[str]:
    """Every form of `values` a text masker searches for (see `text_values` and `value_forms`)."""
    plain, as_is = text_values(values)
    return {form for value in plain for form in value_forms(value)} | as_is


# Above this many forms in the delta part, the base part is rebuilt (about 4 forms per value).
DELTA_FORMS = 1000


class KnownIndex:
    """Keeps the `KnownForms` of a changing set of values, without stalling the event loop (forms.py).

    A value added is masked at once: it goes into the small delta part, rebuilt on the spot. The large base
    part is rebuilt in a worker thread, and only when the delta grew past `DELTA_FORMS` or values were
    removed; a removed value stays masked until then (masking a little more for a moment is safe, less is
    not). Changes during a rebuild are folded into the next one, so a burst of events costs one rebuild. A
    re-list that finds the same values (after an expired watch version) rebuilds nothing.

    Parts are published with their automata first; their Hyperscan literal databases (forms.py
    `LiteralScan`, much faster to search, slow to compile) are compiled in a worker thread and published
    when ready, if the part is still in use. Until then, the automata search: the same spans."""

    def __init__(self, publish: Callable[[KnownForms], None]):
        self.publish = publish
        self.base, self.base_values = FormSet.build(()), frozenset[str]()
        self.delta, self.delta_values = FormSet.build(()), frozenset[str]()
        self.wanted: set[str] = set()
        self.rebuilds = 0  # base rebuilds done in the worker thread (tests and diagnostics)
        self._rebuild: asyncio.Task[None] | None = None
        self._again = False
        self._compile: asyncio.Task[None] | None = None

    def set_now(self, values: Iterable[str]) -> None:
        """Index exactly `values`, synchronously (start-up, tests)."""
        self.base_values = frozenset(values)
        self.wanted = set(self.base_values)
        self.base = FormSet.build(forms_of(self.base_values))
        self.delta, self.delta_values = FormSet.build(()), frozenset()
        self.publish(KnownForms([self.base]))
        self._compile_literals()

    def update(self, values: Iterable[str]) -> None:
        """The values are now `values` (a pass over all of them: `change` costs only what changed)."""
        values = set(values)
        self.change(values - self.wanted, self.wanted - values)

    def change(self, added: set[str], removed: set[str]) -> None:
        """`added` values came, `removed` ones went. Call on the event loop."""
        self.wanted |= added
        self.wanted -= removed
        base, delta = self.base_values, self.delta_values
        new = {value for value in added if value not in base and value not in delta}
        if new and not base and self._rebuild is None:
            self.set_now(self.wanted)  # the first listing: nothing to keep serving meanwhile
            return
        if new:
            self.delta_values |= new
            self.delta = FormSet.build(forms_of(self.delta_values))
            self.publish(KnownForms([self.base, self.delta]))
        gone = any(value in base or value in delta for value in removed)
        if self.delta.size > DELTA_FORMS or gone:
            self._schedule()
        elif new:
            self._compile_literals()

    def _compile_literals(self) -> None:
        """Compile the literal databases of the parts in use that lack one, in a worker thread (with no
        running loop — synchronous use — the automata serve)."""
        if not scanner.available() or (self._compile is not None and not self._compile.done()):
            return  # the running compilation looks again at the parts in use when it is done
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._compile = loop.create_task(self._compile_missing())

    async def _compile_missing(self) -> None:
        while True:
            base, delta = self.base, self.delta
            if base.literals is not None or not base.size:
                if delta.literals is not None or not delta.size:
                    return
            try:
                compiled = await asyncio.to_thread(_with_literals, base, delta)
            except Exception:  # the automata keep serving: the same spans, slower
                log.exception("masking: compiling the known values' literal database failed")
                return
            if compiled[0] is base and compiled[1] is delta:
                return  # none can be built (a form with a NUL byte): the automata serve
            if self.base is base:
                self.base = compiled[0]
            if self.delta is delta:
                self.delta = compiled[1]
            if self.base is compiled[0] or self.delta is compiled[1]:
                self.publish(KnownForms([self.base, self.delta]))

    def _schedule(self) -> None:
        if self._rebuild is not None and not self._rebuild.done():
            self._again = True
            return
        self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_base())

    async def _rebuild_base(self) -> None:
        while True:
            self._again = False
            snapshot = frozenset(self.wanted)
            try:
                base = await asyncio.to_thread(_build_all, snapshot)
            except Exception:  # the parts in use stay (they mask every value still wanted, and more)
                log.exception("masking: rebuilding the known values' index failed")
                return
            self.base, self.base_values = base, snapshot
            self.delta_values = frozenset(self.wanted - snapshot)  # added while the base was built
            self.delta = FormSet.build(forms_of(self.delta_values))
            self.rebuilds += 1
            self.publish(KnownForms([self.base, self.delta]))
            self._compile_literals()
            if not self._again:
                return

    async def close(self) -> None:
        for task in (self._rebuild, self._compile):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _with_literals(base: FormSet, delta: FormSet) -> tuple[FormSet, FormSet]:
    return base.with_literals(), delta.with_literals()


def _build_all(values: frozenset[str]) -> FormSet:
    return FormSet.build(forms_of(values), literals=True)
