"""The sandbox cluster: an HTTPS server that speaks the kube-apiserver's REST wire protocol.

Real kubectl and client libraries are pointed at it directly, so it follows the apiserver where clients can
tell the difference. This module assembles it: every request is recorded (so gateway tests can assert on
what reached it), authenticated, routed and answered; the concerns live in modules of their own:

* auth.py: authentication, impersonation headers, the tiny RBAC and its denials
* requestinfo.py, selection.py: request attributes (RequestInfoFactory) and label/field selectors
* negotiation.py: content negotiation (JSON, YAML, Table, PartialObjectMetadata) and Status answers
* apibase.py: shared state (store, pod runtime) and request bodies (JSON, YAML, protobuf)
* reads.py: get, list, watch; writes.py: create, update, patch, apply, delete, reviews
* strategies.py, kubelet.py: defaulting on create/update; pod events and container states
* subresources.py: status, scale, log, exec/attach/port-forward (streams.py), token, proxy (proxy.py),
  eviction, ephemeral containers; the pod runtime is runtime.py
* discovery.py: discovery documents, /version, health, OpenAPI
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kubegate.core.tls import ensure_self_signed, write_client_certificate

from . import goparse, seed
from .apibase import MAX_BODY, log
from .auth import (
    ADMIN_USER,
    GATEWAY_USER,
    IDENTITY_KEY,
    REAL_IDENTITY_KEY,
    RECORD_KEY,
    Identity,
    allowed,
    authenticate,
    forbidden,
    impersonate,
)
from .discovery import Discovery
from .negotiation import generic_error, json_response
from .requestinfo import parse_request_info
from .resources import RESOURCES, lookup
from .store import ApiError, status_body
from .subresources import Subresources

GZIP_THRESHOLD = 128 * 1024  # apiserver's APIResponseCompression threshold


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SandboxAPI(Subresources, Discovery):
    """The sandbox API server: records and authenticates every request, then routes it to a handler."""

    async def seed(self) -> None:
        for manifest in seed.objects():
            resource = next(
                r for r in RESOURCES if r.kind == manifest["kind"] and r.api_version == manifest["apiVersion"]
            )
            await self.create_object(resource, manifest.get("metadata", {}).get("namespace", ""), manifest)

    def start_background(self) -> None:
        self._kubelet_task = asyncio.create_task(self._kubelet())

    async def close(self) -> None:
        if self._kubelet_task:
            self._kubelet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._kubelet_task
        await self.runtime.close()

    def app(self) -> web.Application:
        # client_max_size is enforced by our own streaming read (413 as a Status, chunked bodies included).
        app = web.Application(middlewares=[self.middleware], client_max_size=MAX_BODY * 4)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_response_prepare.append(_apiserver_headers)
        return app

    def _record(self, request: web.Request) -> dict[str, Any]:
        self._record_id += 1
        auth = request.headers.get("Authorization")
        auth_hash = None
        if auth is not None:
            token = auth.split(" ", 1)[1].strip() if " " in auth else auth
            auth_hash = hashlib.sha256(token.encode()).hexdigest()
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(
                f"sha256:{auth_hash}" if k.lower() == "authorization" else v
            )
        extra: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            if k.lower().startswith("impersonate-extra-"):
                extra.setdefault(urllib.parse.unquote(k[len("impersonate-extra-") :]).lower(), []).append(v)
        record = {
            "id": self._record_id,
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "raw_query": request.raw_path.partition("?")[2],
            "acted": None,
            "user": None,
            "groups": [],
            "authenticated_as": None,
            "impersonate_user": request.headers.get("Impersonate-User"),
            "impersonate_groups": request.headers.getall("Impersonate-Group", []),
            "impersonate_uid": request.headers.get("Impersonate-Uid"),
            "impersonate_extra": extra,
            "authorization_sha256": auth_hash,
            "headers": headers,
            "user_agent": request.headers.get("User-Agent"),
            "websocket": request.headers.get("Upgrade", "").lower() == "websocket",
            "status": None,
        }
        self.records.append(record)
        return record

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = self._record(request)
        request[RECORD_KEY] = record
        # Every handler reads the query the way the API server does: Go's url.ParseQuery (first value of a
        # repeated key for `.get`, pairs with `;` or bad escapes dropped), not yarl's reading of it.
        request._cache["query"] = goparse.go_query(request.raw_path.partition("?")[2])
        try:
            real = authenticate(request, self.token)
            if real is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            record["authenticated_as"] = real.user
            effective = impersonate(request, real)
            if isinstance(effective, web.StreamResponse):
                record["status"] = effective.status
                return effective
            record["user"] = effective.user
            record["groups"] = effective.groups
            request[IDENTITY_KEY] = effective
            request[REAL_IDENTITY_KEY] = real
            response = await handler(request)
        except ApiError as err:
            response = json_response(err.status(), err.code)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug must still surface as a Status, like the apiserver's recovery
            log.exception("internal error on %s %s", request.method, request.path)
            response = json_response(
                status_body(500, "InternalError", f"Internal error occurred: {exc}"), 500
            )
        record["status"] = response.status
        # The apiserver gzips non-streaming responses over 128 KiB when the client accepts it (kubectl does):
        # whatever sits in between must cope with Content-Encoding.
        body = response.body if isinstance(response, web.Response) else None
        if (
            isinstance(body, bytes)
            and len(body) > GZIP_THRESHOLD
            and "gzip" in request.headers.get("Accept-Encoding", "").lower()
        ):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        identity: Identity = request[IDENTITY_KEY]
        if request.path.startswith("/sandbox/"):
            return await self._sandbox_admin(request)
        try:
            # req.URL.Path as Go's server decodes it (yarl's request.path keeps %2B and friends encoded).
            path = goparse.go_path(request.raw_path.partition("?")[0])
        except goparse.BadEscape as exc:
            raise ApiError(400, "BadRequest", f"invalid URL escape {str(exc)!r}") from None
        info = parse_request_info(request.method, path, request.query)
        request[RECORD_KEY]["acted"] = {
            "verb": info.verb,
            "namespace": info.namespace,
            "resource": info.resource,
            "subresource": info.subresource,
            "name": info.name,
            # what an exec runs: request.query is Go's reading (see `middleware`), as handle_exec reads it
            "command": request.query.getall("command", []) if info.subresource == "exec" else [],
        }
        if not info.is_resource:
            return await self._non_resource(request, info)
        resource = lookup(info.group, info.version, info.resource)
        if (resource is None or not resource.namespaced) and info.resource != "namespaces":
            info.namespace = ""
        authz_verb = info.verb
        if info.subresource in ("exec", "attach", "portforward"):
            authz_verb = "create"  # websocket upgrades are GETs, but need create (KEP-4006)
        # Authorization runs before routing in the apiserver's filter chain: a denied user learns nothing
        # about which resources exist.
        if not allowed(identity, authz_verb, info.resource, info.group):
            raise forbidden(
                identity.user,
                authz_verb,
                info.resource,
                info.group,
                info.namespace,
                info.name,
                info.subresource,
            )
        if resource is None:
            raise generic_error(404)
        if info.subresource:
            return await self._subresource(request, resource, info)
        if len(info.parts) > 3 or (info.resource == "namespaces" and info.subresource):
            raise generic_error(404)
        ns = info.namespace if resource.namespaced else ""
        if resource.namespaced and not ns and info.verb not in ("list", "watch"):
            # Only list and watch are served across namespaces (/api/v1/pods); no other route exists.
            if info.name:
                raise generic_error(404)
            raise generic_error(405)
        verb = info.verb
        if resource.virtual:
            if verb != "create":
                raise generic_error(405)
            return await self._review(request, resource, identity)
        if verb == "list":
            return await self._list(request, resource, ns)
        if verb == "watch":
            return await self._watch(request, resource, ns, info.name)
        if verb == "get":
            return await self._get(request, resource, ns, info.name)
        if verb == "create":
            if info.name:
                raise generic_error(405)
            body = await self._read_object(request, resource)
            obj, _created = await self._create(request, resource, ns, body)
            return json_response(obj, 201)
        if verb == "update":
            body = await self._read_object(request, resource)
            return json_response(await self._update(request, resource, ns, info.name, body))
        if verb == "patch":
            return await self._patch(request, resource, ns, info.name)
        if verb == "delete":
            return await self._delete(request, resource, ns, info.name)
        if verb == "deletecollection":
            return await self._delete_collection(request, resource, ns)
        raise generic_error(405)

    async def _sandbox_admin(self, request: web.Request) -> web.StreamResponse:
        real: Identity = request[REAL_IDENTITY_KEY]
        identity: Identity = request[IDENTITY_KEY]
        if real.user not in (ADMIN_USER, GATEWAY_USER) or identity is not real:
            raise ApiError(403, "Forbidden", f'User "{identity.user}" cannot get path "{request.path}"')
        if request.path.rstrip("/") == "/sandbox/requests" and request.method == "GET":
            try:
                since = int(request.query.get("since", "0"))
            except ValueError as exc:
                raise ApiError(400, "BadRequest", "since must be an integer") from exc
            items = [r for r in list(self.records) if r["id"] > since]
            return json_response({"items": items, "next": self._record_id})
        raise generic_error(404)


async def _apiserver_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every apiserver response carries (and no Server header, which the apiserver never sends)."""
    response.headers.popall("Server", None)
    response.headers.setdefault("Audit-Id", str(uuid.uuid4()))
    if response.status != 101:
        response.headers.setdefault("Cache-Control", "no-cache, private")


@dataclass
class SandboxHandle:
    url: str
    port: int
    token: str
    kubeconfig: Path
    ca_file: Path
    client_cert: Path
    client_key: Path
    api: SandboxAPI
    runner: web.AppRunner

    def info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "port": self.port,
            "kubeconfig": str(self.kubeconfig),
            "token": self.token,
            "ca_file": str(self.ca_file),
            "client_cert": str(self.client_cert),
            "client_key": str(self.client_key),
        }

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.api.close()


def write_kubeconfig(path: Path, url: str, ca_file: Path, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "sandbox",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "sandbox-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": "sandbox",
                "context": {"cluster": "sandbox", "user": "sandbox-admin", "namespace": "default"},
            }
        ],
        "current-context": "sandbox",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


async def start_sandbox(directory: Path, host: str = "127.0.0.1", port: int = 0) -> SandboxHandle:
    """Start a seeded sandbox cluster in this event loop; returns once it accepts connections."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = ensure_self_signed(directory / "tls", common_name="kubegate-sandbox", hostnames=[host])
    token_file = directory / "token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(32))
        token_file.chmod(0o600)
    token = token_file.read_text().strip()
    client_cert, client_key = write_client_certificate(files, directory, "client", GATEWAY_USER)

    api = SandboxAPI(directory, token, files.ca_cert)
    await api.seed()
    api.start_background()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # client certificates authenticate when present; tokens otherwise
    ctx.set_alpn_protocols(["http/1.1"])

    runner = web.AppRunner(api.app(), access_log=log, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    await site.start()
    actual_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    url = f"https://{url_host}:{actual_port}"
    api.server_address = f"{url_host}:{actual_port}"
    kubeconfig = directory / "kubeconfig"
    write_kubeconfig(kubeconfig, url, files.ca_cert, token)
    return SandboxHandle(
        url, actual_port, token, kubeconfig, files.ca_cert, client_cert, client_key, api, runner
    )
