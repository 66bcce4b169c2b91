"""Known secret values: the gateway lists and watches the cluster's Secrets with its own credential and
masks exact occurrences of their values in text and bodies — as CI systems mask registered secrets.

A value is known from the moment the watch event that carries it arrives (a full re-list follows any
broken watch). Memory is bounded: at most `max_values` values of at most `max_value_bytes` each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

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
        for encoded in (secret.get("data") or {}).values():
            try:
                value = base64.b64decode(encoded or "", validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue  # binary (a keystore, say): not something text output would show
            value = value.strip()
            if self.min_length <= len(value) <= self.max_value_bytes:
                found.add(value)
        for value in (secret.get("stringData") or {}).values():
            if isinstance(value, str) and self.min_length <= len(value.strip()) <= self.max_value_bytes:
                found.add(value.strip())
        return found

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
