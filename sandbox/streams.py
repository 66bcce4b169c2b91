"""exec / attach / port-forward subresources for the sandbox cluster (stub, being filled in)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kubegate.sandbox.runtime import PodRuntime


async def handle_exec(request: web.Request, runtime: PodRuntime, pod: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"kind": "Status", "status": "Failure", "code": 501}, status=501)


async def handle_attach(request: web.Request, runtime: PodRuntime, pod: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"kind": "Status", "status": "Failure", "code": 501}, status=501)


async def handle_portforward(
    request: web.Request, runtime: PodRuntime, pod: dict[str, Any]
) -> web.StreamResponse:
    return web.json_response({"kind": "Status", "status": "Failure", "code": 501}, status=501)
