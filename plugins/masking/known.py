"""Known secret values: the gateway lists and watches the cluster's Secrets with its own credential and
masks exact occurrences of their values in text and bodies — as CI systems mask registered secrets.

A value is known from the moment the watch event that carries it arrives (a full re-list follows any
broken watch). Memory is bounded: at most `max_values` values of at most `max_value_bytes` bytes each, of
at least `min_length` characters (shorter ones would mask common words). Binary values (not UTF-8: a
keystore, a DER key) are learned too, as their bytes decoded with `surrogateescape` — the way text output
is read (`TextMasker.mask_bytes`) — so their raw bytes in logs or exec output are masked, and their base64
and URL-encoded forms anywhere. Secret objects themselves are masked by structure, whatever their values'
size or bytes (`objects.py`); this is for the same values showing up elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from . import scanner
from .forms import FormSet, KnownForms
from .text import value_forms

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection

log = logging.getLogger("kubegate.masking")
RETRY_SECONDS = 5.0


class KnownSecrets:
    def __init__(self, connection: Connection, namespaces: list[str], min_length: int, max_values: int,
                 max_value_bytes: int, on_change: Callable[[set[str]], None]):  # fmt: skip
        self.connection = connection
        self.namespaces = namespaces or [""]
        self.min_length, self.max_values, self.max_value_bytes = min_length, max_values, max_value_bytes
        self.on_change = on_change
        self.by_secret: dict[str, set[str]] = {}
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(ns)) for ns in self.namespaces]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def values(self) -> set[str]:
        out: set[str] = set()
        for values in self.by_secret.values():
            out |= values
            if len(out) >= self.max_values:
                break
        return set(sorted(out, key=len, reverse=True)[: self.max_values])

    def _extract(self, secret: dict[str, Any]) -> set[str]:
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
        return found

    def _add(self, found: set[str], raw: bytes) -> None:
        raw = raw.strip(b" \t\r\n")  # `echo pw > file` leaves a newline the output will not show with it
        value = raw.decode("utf-8", "surrogateescape")  # binary bytes become lone surrogates, as in output
        if len(value) >= self.min_length and len(raw) <= self.max_value_bytes:
            found.add(value)

    def _key(self, secret: dict[str, Any]) -> str:
        meta = secret.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _changed(self) -> None:
        self.on_change(self.values())

    def _url(self, namespace: str) -> str:
        base = self.connection.upstream.base_url
        return f"{base}/api/v1/namespaces/{namespace}/secrets" if namespace else f"{base}/api/v1/secrets"

    async def _follow(self, namespace: str) -> None:
        upstream = self.connection.upstream
        while True:
            try:
                headers = [*upstream.credential_headers(), ("Accept", "application/json")]
                async with upstream.session.get(self._url(namespace), headers=headers,
                                                **upstream.request_options) as response:  # fmt: skip
                    if response.status != 200:
                        raise RuntimeError(f"listing secrets answered {response.status}")
                    listing = json.loads(await response.read())
                fresh = {self._key(s): self._extract(s) for s in listing.get("items") or []}
                for key in [k for k in self.by_secret if _in(k, namespace)]:
                    self.by_secret.pop(key)
                self.by_secret.update(fresh)
                self._changed()
                self.ready.set()
                version = (listing.get("metadata") or {}).get("resourceVersion", "")
                await self._watch(namespace, version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the gateway may lack the RBAC, or the API server is down: retry
                log.warning("masking on %s: cannot follow secrets (%s); retrying", self.connection.name, exc)
                self.ready.set()  # do not hold anything back on it
            await asyncio.sleep(RETRY_SECONDS)

    async def _watch(self, namespace: str, version: str) -> None:
        upstream = self.connection.upstream
        headers = [*upstream.credential_headers(), ("Accept", "application/json")]
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with upstream.session.get(self._url(namespace), headers=headers, params=params, timeout=timeout,
                                        **upstream.request_options) as response:  # fmt: skip
            if response.status != 200:
                return
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                secret = event.get("object") or {}
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED"):
                    self.by_secret[self._key(secret)] = self._extract(secret)
                elif kind == "DELETED":
                    self.by_secret.pop(self._key(secret), None)
                else:
                    continue
                self._changed()


def _in(key: str, namespace: str) -> bool:
    return not namespace or key.startswith(f"{namespace}/")


def text_values(values: Iterable[str]) -> tuple[set[str], set[str]]:
    """Known values as `TextMasker` takes them, and the binary ones it cannot take.

    A value with characters JSON escapes (a quote, a backslash, a newline of a PEM key) is also given in
    its escaped form, since the value pass runs over serialized JSON text. A binary value is given as its
    base64 forms (standard and URL-safe, padded or not) and URL-encoding, and its raw form (which
    `value_forms` cannot encode) is returned apart, to be searched as it is."""
    plain: set[str] = set()
    binary: set[str] = set()
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            binary.add(value)
            continue
        plain.add(value)
        escaped = orjson.dumps(value)[1:-1].decode()
        if escaped != value:
            plain.add(escaped)
    for value in binary:
        raw = value.encode("utf-8", "surrogateescape")
        forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
        plain |= forms | {form.rstrip("=") for form in forms} | {quote(raw, safe="")}
    return plain, binary


def forms_of(values: Iterable[str]) -> set[str]:
    """Every form of `values` a text masker searches for (see `text_values` and `value_forms`)."""
    plain, binary = text_values(values)
    return {form for value in plain for form in value_forms(value)} | binary


# Above this many forms in the delta part, the base part is rebuilt (about 4 forms per value).
DELTA_FORMS = 1000


class KnownIndex:
    """Keeps the `KnownForms` of a changing set of values, without stalling the event loop (forms.py).

    A value added is masked at once: it goes into the small delta part, rebuilt on the spot. The large base
    part is rebuilt in a worker thread, and only when the delta grew past `DELTA_FORMS` or values were
    removed; a removed value stays masked until then (masking a little more for a moment is safe, less is
    not). Changes during a rebuild are folded into the next one, so a burst of events costs one rebuild. A
    re-list that finds the same values (every broken or expired watch) rebuilds nothing.

    Parts are published with their automata first; their Hyperscan literal databases (forms.py
    `LiteralScan`, much faster to search, slow to compile) are compiled in a worker thread and published
    when ready, if the part is still in use. Until then, the automata search: the same spans."""

    def __init__(self, publish: Callable[[KnownForms], None]):
        self.publish = publish
        self.base, self.base_values = FormSet.build(()), frozenset[str]()
        self.delta, self.delta_values = FormSet.build(()), frozenset[str]()
        self.wanted: frozenset[str] = frozenset()
        self.rebuilds = 0  # base rebuilds done in the worker thread (tests and diagnostics)
        self._rebuild: asyncio.Task[None] | None = None
        self._again = False
        self._compile: asyncio.Task[None] | None = None

    def set_now(self, values: Iterable[str]) -> None:
        """Index exactly `values`, synchronously (start-up, tests)."""
        self.wanted = self.base_values = frozenset(values)
        self.base = FormSet.build(forms_of(self.base_values))
        self.delta, self.delta_values = FormSet.build(()), frozenset()
        self.publish(KnownForms([self.base]))
        self._compile_literals()

    def update(self, values: Iterable[str]) -> None:
        """The values are now `values`. Call on the event loop."""
        self.wanted = frozenset(values)
        covered = self.base_values | self.delta_values
        added = self.wanted - covered
        if added and not self.base_values and self._rebuild is None:
            self.set_now(self.wanted)  # the first listing: nothing to keep serving meanwhile
            return
        if added:
            self.delta_values |= added
            self.delta = FormSet.build(forms_of(self.delta_values))
            self.publish(KnownForms([self.base, self.delta]))
        if self.delta.size > DELTA_FORMS or not covered <= self.wanted:
            self._schedule()
        elif added:
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
            snapshot = self.wanted
            try:
                base = await asyncio.to_thread(_build_all, snapshot)
            except Exception:  # the parts in use stay (they mask every value still wanted, and more)
                log.exception("masking: rebuilding the known values' index failed")
                return
            self.base, self.base_values = base, snapshot
            self.delta_values = self.wanted - snapshot  # added while the base was built
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
