"""The sandbox API's shared state and helpers (bodies, lookups, Status errors), base of the handlers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kubegate.core import protobuf

from . import openapi
from .auth import (
    qualified,
)
from .resources import Resource
from .store import ApiError, Store, not_found, now_iso

log = logging.getLogger("kubegate.sandbox")

MAX_BODY = 3 * 1024 * 1024  # the apiserver's default request body limit
RECORD_LIMIT = 10_000


class _InertRuntime:
    """Keeps the REST side usable if the process runtime is unavailable: pods 'run' but log nothing."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.started: dict[tuple[str, str], float] = {}

    async def start_pod(self, pod: dict[str, Any]) -> None:
        self.started[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = time.time()

    async def stop_pod(self, namespace: str, name: str) -> None:
        self.started.pop((namespace, name), None)

    def container_state(self, namespace: str, name: str, container: str) -> dict[str, Any]:
        return {"running": {"startedAt": now_iso()}}

    async def start_ephemeral(self, namespace: str, name: str, spec: dict[str, Any]) -> bool:
        return (namespace, name) in self.started

    def port_address(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        return None

    async def stream_logs(self, *_: Any, **__: Any) -> Any:
        return
        yield b""  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        self.started.clear()


def _make_runtime(
    root: Path, resolve_secret: Callable[..., Any], resolve_configmap: Callable[..., Any]
) -> Any:
    try:
        from .runtime import PodRuntime
    except ImportError as exc:  # pragma: no cover - only while the runtime is being developed
        log.warning("pod runtime unavailable (%s); pods will not run processes", exc)
        return _InertRuntime()
    return PodRuntime(root, resolve_secret, resolve_configmap)


class ApiBase:
    """The sandbox API's state (store, pod runtime, recorded requests) and what every handler uses:
    request bodies and the lookups and errors shared by reads, writes and subresources."""

    def __init__(self, directory: Path, token: str, ca_file: Path) -> None:
        self.directory = directory
        self.token = token
        self.ca_file = ca_file
        self.store = Store()
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORD_LIMIT)
        self._record_id = 0
        self.runtime = _make_runtime(directory / "pods", self._resolve_secret, self._resolve_configmap)
        self.openapi_docs = openapi.documents()
        self._ip_counter = 10
        self._svc_counter = 10
        self._kubelet_task: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.server_address = ""

    def _resolve_secret(self, namespace: str, name: str, key: str) -> str | None:
        obj = self.store.get("/secrets", namespace, name)
        value = ((obj or {}).get("data") or {}).get(key)
        if value is None:
            return None
        return base64.b64decode(value).decode("utf-8", "replace")

    def _resolve_configmap(self, namespace: str, name: str, key: str) -> str | None:
        obj = self.store.get("/configmaps", namespace, name)
        return ((obj or {}).get("data") or {}).get(key)

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY}")
        data = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY}")
        return bytes(data)

    async def _read_object(self, request: web.Request, resource: Resource) -> dict[str, Any]:
        raw = await self._read_body(request)
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                obj = protobuf.decode_body(raw)
            except protobuf.UnsupportedKind as exc:
                raise ApiError(415, "UnsupportedMediaType", str(exc)) from exc
            except (protobuf.ProtobufError, KeyError, UnicodeDecodeError) as exc:
                raise ApiError(400, "BadRequest", f"unable to decode protobuf body: {exc}") from exc
        elif ctype in ("application/json", ""):
            try:
                obj = json.loads(raw or b"null")
            except ValueError as exc:
                raise ApiError(
                    400, "BadRequest", f"the body of the request was not valid JSON: {exc}"
                ) from exc
        elif ctype in ("application/yaml", "application/x-yaml", "text/yaml"):
            try:
                obj = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ApiError(
                    400, "BadRequest", f"the body of the request was not valid YAML: {exc}"
                ) from exc
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f'application/json, application/yaml, application/vnd.kubernetes.protobuf (got "{ctype}")',
            )
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be a JSON object")
        self._check_kind(resource, obj)
        return obj

    @staticmethod
    def _check_kind(resource: Resource, obj: dict[str, Any]) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind and kind != resource.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the kind of the object ({kind}) does not match the expected kind ({resource.kind})",
            )
        if api_version and api_version != resource.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({api_version}) does not match the "
                f"expected API version ({resource.api_version})",
            )

    def _require_namespace(self, ns: str) -> None:
        if self.store.get("/namespaces", "", ns) is None:
            raise not_found("namespaces", ns)

    def _get_or_404(self, resource: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.store.get(resource.key, ns, name)
        if obj is None:
            raise not_found(resource.plural, name, resource.group)
        return obj

    @staticmethod
    def _dry_run(request: web.Request) -> bool:
        values = request.query.getall("dryRun", [])
        for v in values:
            if v != "All":
                raise ApiError(
                    400, "BadRequest", f'dryRun: Unsupported value: "{v}": supported values: "All"'
                )
        return bool(values)

    @staticmethod
    def _exists(resource: Resource, name: str) -> ApiError:
        details: dict[str, Any] = {"name": name, "kind": resource.plural}
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            409,
            "AlreadyExists",
            f'{qualified(resource.plural, resource.group)} "{name}" already exists',
            details,
        )

    @staticmethod
    def _invalid(resource: Resource, name: str, fieldpath: str, what: str, detail: str) -> ApiError:
        cause_msg = f"{what}: {detail}"
        details: dict[str, Any] = {
            "name": name,
            "kind": resource.kind,
            "causes": [
                {
                    "reason": "FieldValueInvalid" if what.startswith("Invalid") else "FieldValueRequired",
                    "message": cause_msg,
                    "field": fieldpath,
                }
            ],
        }
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            422, "Invalid", f'{resource.kind} "{name}" is invalid: {fieldpath}: {cause_msg}', details
        )

    def _conflict(self, resource: Resource, name: str) -> ApiError:
        details: dict[str, Any] = {"name": name, "kind": resource.plural}
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {qualified(resource.plural, resource.group)} "{name}": the object '
            "has been modified; please apply your changes to the latest version and try again",
            details,
        )
