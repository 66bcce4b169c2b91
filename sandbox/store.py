"""In-memory object store with a single, global resourceVersion (like etcd's revision) and watch fan-out.

Objects are plain JSON-shaped dicts. Every write bumps the global revision, stamps it on the object as a
string (clients must treat it as opaque) and appends an event to a bounded history so a watch can resume
from any recent resourceVersion.
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import datetime as dt
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HISTORY = 20000


class ApiError(Exception):
    """An error the apiserver would answer with a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        return status_body(self.code, self.reason, self.message, self.details)


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def not_found(plural: str, name: str, group: str = "") -> ApiError:
    what = f"{plural}.{group}" if group else plural
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return ApiError(404, "NotFound", f'{what} "{name}" not found', details)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    rv: int
    key: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass(eq=False)  # identity semantics: watchers live in a set
class Watcher:
    key: str
    namespace: str | None
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


class Store:
    def __init__(self) -> None:
        self._rv = 0
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._watchers: set[Watcher] = set()

    # --- reads ----------------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._rv

    def get(self, key: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._objects.get(key, {}).get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, key: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Objects sorted by (namespace, name), the etcd key order the apiserver lists in."""
        items = self._objects.get(key, {})
        return [copy.deepcopy(items[k]) for k in sorted(items) if namespace is None or k[0] == namespace]

    def keys(self) -> Iterator[str]:
        return iter(list(self._objects))

    def history_since(self, rv: int, key: str) -> builtins.list[Event] | None:
        """Events after rv for key; None when rv is older than the retained history (410 Gone)."""
        if self._history and rv < self._history[0].rv - 1:
            return None
        return [e for e in self._history if e.rv > rv and e.key == key]

    # --- writes ---------------------------------------------------------------------------------------

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        ident = (meta.get("namespace", ""), meta["name"])
        bucket = self._objects.setdefault(key, {})
        if ident in bucket:
            raise KeyError(ident)
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._bump()
        meta["creationTimestamp"] = now_iso()
        bucket[ident] = copy.deepcopy(obj)
        self._emit(Event(self._rv, key, "ADDED", copy.deepcopy(obj)))
        return obj

    def update(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        ident = (meta.get("namespace", ""), meta["name"])
        bucket = self._objects.setdefault(key, {})
        old = bucket[ident]
        meta["resourceVersion"] = self._bump()
        bucket[ident] = copy.deepcopy(obj)
        self._emit(Event(self._rv, key, "MODIFIED", copy.deepcopy(obj), copy.deepcopy(old)))
        return obj

    def delete(self, key: str, namespace: str, name: str) -> dict[str, Any]:
        bucket = self._objects.get(key, {})
        obj = bucket.pop((namespace, name))
        # The DELETED event carries the object at a new revision, as etcd's delete revision does.
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit(Event(self._rv, key, "DELETED", copy.deepcopy(obj)))
        return obj

    # --- watch ----------------------------------------------------------------------------------------

    def subscribe(self, key: str, namespace: str | None) -> Watcher:
        w = Watcher(key, namespace)
        self._watchers.add(w)
        return w

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def _emit(self, event: Event) -> None:
        self._history.append(event)
        ns = event.obj.get("metadata", {}).get("namespace", "")
        for w in list(self._watchers):
            if w.key == event.key and (w.namespace is None or w.namespace == ns):
                w.queue.put_nowait(event)
