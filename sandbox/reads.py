"""Reads: get, list and watch in every form negotiation allows (object, Table, PartialObjectMetadata)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import goparse, tables
from .apibase import ApiBase
from .negotiation import json_response, negotiate, render
from .resources import Resource
from .selection import fields_match, labels_match, parse_field_selector, parse_label_selector
from .store import ApiError, Event, status_body

BOOKMARK_INTERVAL = 60.0


class Reads(ApiBase):
    """get, list (selectors, limit/continue) and watch (replay, bookmarks, selector transitions)."""

    async def _get(self, request: web.Request, resource: Resource, ns: str, name: str) -> web.StreamResponse:
        form, meta_version = negotiate(request)
        obj = self._get_or_404(resource, ns, name)
        if form == "table":
            t = tables.table(
                resource,
                [obj],
                resource_version=obj["metadata"]["resourceVersion"],
                include_object=request.query.get("includeObject", "Metadata"),
            )
            t["apiVersion"] = f"meta.k8s.io/{meta_version}"
            return json_response(t)
        if form == "pom":
            pom = tables.partial_metadata(obj)
            pom["apiVersion"] = f"meta.k8s.io/{meta_version}"
            return json_response(pom)
        return render(obj, form)

    def _selected(
        self, request: web.Request, resource: Resource, ns: str | None, name: str = ""
    ) -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], bool]]:
        label_reqs = parse_label_selector(request.query.get("labelSelector", ""))
        field_reqs = parse_field_selector(resource, request.query.get("fieldSelector", ""))

        def match(obj: dict[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            if name and meta.get("name") != name:
                return False
            return labels_match(label_reqs, meta.get("labels") or {}) and fields_match(field_reqs, obj)

        items = (
            self.store.list(resource.key, ns or None)
            if resource.namespaced
            else self.store.list(resource.key)
        )
        return [o for o in items if match(o)], match

    async def _list(self, request: web.Request, resource: Resource, ns: str) -> web.StreamResponse:
        form, meta_version = negotiate(request)
        items, _ = self._selected(request, resource, ns)
        rv = str(self.store.revision)
        list_meta: dict[str, Any] = {"resourceVersion": rv}
        cont = request.query.get("continue")
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont + "=" * (-len(cont) % 4)))
                start = token["start"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ApiError(
                    400, "BadRequest", "continue key is not valid: invalid continue token"
                ) from exc
            items = [o for o in items if _obj_key(o) > start]
        limit = request.query.get("limit")
        if limit and limit.isdigit() and int(limit) > 0 and len(items) > int(limit):
            n = int(limit)
            remaining = len(items) - n
            items = items[:n]
            token_body = {"v": "meta.k8s.io/v1", "rv": int(rv), "start": _obj_key(items[-1])}
            list_meta["continue"] = (
                base64.urlsafe_b64encode(json.dumps(token_body).encode()).decode().rstrip("=")
            )
            list_meta["remainingItemCount"] = remaining
        if form == "table":
            t = tables.table(
                resource,
                items,
                include_object=request.query.get("includeObject", "Metadata"),
                list_meta=list_meta,
            )
            t["apiVersion"] = f"meta.k8s.io/{meta_version}"
            return json_response(t)
        if form == "pom":
            return json_response(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": f"meta.k8s.io/{meta_version}",
                    "metadata": list_meta,
                    "items": [tables.partial_metadata(o) for o in items],
                }
            )
        for o in items:
            # The apiserver's list items carry no kind/apiVersion of their own (the list has them).
            o.pop("kind", None)
            o.pop("apiVersion", None)
        return render(
            {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": list_meta,
                "items": items,
            },
            form,
        )

    async def _watch(
        self, request: web.Request, resource: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        form, meta_version = negotiate(request)
        _, match = self._selected(request, resource, None, name)
        include_object = request.query.get("includeObject", "Metadata")
        timeout = request.query.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout and timeout.isdigit() else None
        bookmarks = goparse.go_bool(request.query, "allowWatchBookmarks")
        rv_param = request.query.get("resourceVersion", "")
        send_initial = goparse.go_bool(request.query, "sendInitialEvents")
        scope_ns = ns if resource.namespaced and ns else None

        watcher = self.store.subscribe(resource.key, scope_ns)
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
        )
        resp.enable_chunked_encoding()
        first_table = True

        def encode(kind: str, obj: dict[str, Any]) -> bytes:
            nonlocal first_table
            out = obj
            if form == "table" and kind != "BOOKMARK" and kind != "ERROR":
                out = tables.table(
                    resource,
                    [obj],
                    resource_version=obj["metadata"].get("resourceVersion", ""),
                    include_object=include_object,
                    with_columns=first_table,
                )
                out["apiVersion"] = f"meta.k8s.io/{meta_version}"
                first_table = False
            elif form == "pom" and kind not in ("BOOKMARK", "ERROR"):
                out = tables.partial_metadata(obj)
            return json.dumps({"type": kind, "object": out}, separators=(",", ":")).encode() + b"\n"

        def bookmark(rv: int, initial_end: bool = False) -> bytes:
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return encode(
                "BOOKMARK", {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": meta}
            )

        try:
            await resp.prepare(request)
            snapshot_rv = self.store.revision
            if rv_param in ("", "0") or send_initial:
                for obj in self.store.list(resource.key, scope_ns):
                    if match(obj):
                        await resp.write(encode("ADDED", obj))
                if send_initial and bookmarks:
                    await resp.write(bookmark(snapshot_rv, initial_end=True))
            else:
                try:
                    since = int(rv_param)
                except ValueError as exc:
                    raise ApiError(400, "BadRequest", f'invalid resource version "{rv_param}"') from exc
                history = self.store.history_since(since, resource.key)
                if history is None:
                    await resp.write(
                        encode(
                            "ERROR",
                            status_body(
                                410, "Expired", f"too old resource version: {since} ({self.store.revision})"
                            ),
                        )
                    )
                    return resp
                for ev in history:
                    if ev.rv <= snapshot_rv:
                        if scope_ns is None or ev.obj["metadata"].get("namespace", "") == scope_ns:
                            data = self._event_bytes(ev, match, encode)
                            if data:
                                await resp.write(data)
            last_bookmark = time.monotonic()
            while True:
                if request.transport is None or request.transport.is_closing():
                    break
                wait = 5.0
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                try:
                    ev = await asyncio.wait_for(watcher.queue.get(), timeout=wait)
                except TimeoutError:
                    if bookmarks and time.monotonic() - last_bookmark >= BOOKMARK_INTERVAL:
                        await resp.write(bookmark(self.store.revision))
                        last_bookmark = time.monotonic()
                    continue
                if ev.rv <= snapshot_rv:
                    continue  # already covered by the initial snapshot or replay
                data = self._event_bytes(ev, match, encode)
                if data:
                    await resp.write(data)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.store.unsubscribe(watcher)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    @staticmethod
    def _event_bytes(
        ev: Event, match: Callable[[dict[str, Any]], bool], encode: Callable[[str, dict[str, Any]], bytes]
    ) -> bytes | None:
        # Selector transitions are reported the apiserver's way: leaving the selection is a DELETED,
        # entering it an ADDED.
        if ev.type == "MODIFIED":
            now, before = match(ev.obj), ev.old is not None and match(ev.old)
            if now and before:
                return encode("MODIFIED", ev.obj)
            if now:
                return encode("ADDED", ev.obj)
            if before:
                return encode("DELETED", ev.obj)
            return None
        return encode(ev.type, ev.obj) if match(ev.obj) else None


def _obj_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
