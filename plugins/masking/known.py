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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import ahocorasick
import aiohttp
import orjson

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection

    from .text import TextMasker

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


@dataclass
class RawValues:
    """Binary known values (`surrogateescape`'d bytes), which `TextMasker` cannot take as values (it
    encodes each to UTF-8 for its base64 and URL forms): added to its automaton as they are."""

    values: set[str]

    def add_to(self, masker: TextMasker) -> None:
        """Mask these in `masker`'s text too (text it reads from bytes with `surrogateescape`)."""
        if not self.values:
            return
        automaton = masker.known if masker.known is not None else ahocorasick.Automaton()
        for value in self.values:
            automaton.add_word(value, len(value))
        automaton.make_automaton()
        masker.known = automaton
        masker.longest = max(masker.longest, *(len(value) for value in self.values))


def text_values(values: set[str]) -> tuple[set[str], RawValues]:
    """Known values as `TextMasker` takes them, and the binary ones it cannot take.

    A value with characters JSON escapes (a quote, a backslash, a newline of a PEM key) is also given in
    its escaped form, since the value pass runs over serialized JSON text. A binary value is given as its
    base64 forms (standard and URL-safe, padded or not) and URL-encoding, and its raw form goes to
    `RawValues`."""
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
    return plain, RawValues(binary)
