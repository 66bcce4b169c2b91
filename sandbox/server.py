"""The sandbox cluster: an HTTPS server that speaks the kube-apiserver's REST wire protocol.

Real kubectl and client libraries are pointed at it directly, so it follows the apiserver where clients can
tell the difference: request parsing (RequestInfoFactory), authentication and impersonation headers,
authorization denials, metav1.Status errors, content negotiation (JSON, Table, PartialObjectMetadata,
aggregated discovery), protobuf request bodies, watch streams, and pod logs / exec / attach / port-forward
through the pod runtime, with the routes that reach containers or end pods without a delete: evictions,
ephemeral containers (`kubectl debug`) and the pods/services proxy (sandbox/proxy.py; how a pod serves a
port is in sandbox/runtime.py). It also records every request so gateway tests can assert on what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import ssl
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kubegate.core import protobuf
from kubegate.core.tls import ensure_self_signed, write_client_certificate

from . import goparse, openapi, seed, tables
from .patch import json_patch, merge_patch, strategic_merge_patch
from .resources import GROUP_ORDER, RESOURCES, Resource, by_group_version, groups, lookup, validate_name
from .store import ApiError, Event, Store, not_found, now_iso, status_body

log = logging.getLogger("kubegate.sandbox")

GIT_VERSION = "v1.32.0-sandbox"
MAX_BODY = 3 * 1024 * 1024  # the apiserver's default request body limit
GZIP_THRESHOLD = 128 * 1024  # apiserver's APIResponseCompression threshold
RECORD_LIMIT = 10_000
ADMIN_USER = "kubegate-admin"
GATEWAY_USER = "kubegate-gateway"
NODE_NAME = "sandbox-node"
NODE_IP = "10.0.0.10"
READONLY_GROUP = "readonly"
READONLY_VERBS = {"get", "list", "watch"}
BOOKMARK_INTERVAL = 60.0
AGGREGATED_CT = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's SimpleNameGenerator alphabet


# ---------------------------------------------------------------------------------------------------------
# Identity, request info
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Identity:
    user: str
    groups: list[str]
    uid: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    def user_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"username": self.user, "groups": self.groups}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = self.extra
        return info


IDENTITY_KEY = web.RequestKey("identity", Identity)
RECORD_KEY = web.RequestKey("record", dict)
REAL_IDENTITY_KEY = web.RequestKey("real_identity", Identity)


@dataclass
class RequestInfo:
    """What the apiserver's RequestInfoFactory derives from a path and method."""

    is_resource: bool
    path: str
    verb: str
    api_prefix: str = ""
    group: str = ""
    version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)


NAMESPACE_SUBRESOURCES = {"status", "finalize"}
METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


def parse_request_info(method: str, path: str, query: dict[str, str] | Any) -> RequestInfo:
    """RequestInfoFactory.NewRequestInfo over the Go-decoded path and `req.URL.Query()` (see goparse)."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    # Go's switch on req.Method is case-sensitive: any other method has no verb.
    verb = METHOD_VERBS.get(method, "")
    plain = RequestInfo(False, path, method.lower())
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return plain
    prefix = parts[0]
    if prefix == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 4:
            return plain
        group, version, rest = parts[1], parts[2], parts[3:]
    info = RequestInfo(True, path, verb, prefix, group, version)
    if rest[0] in ("watch", "proxy"):
        if len(rest) < 2:
            raise ApiError(500, "InternalError", f"unable to determine kind and namespace from url {path}")
        info.verb = rest[0]
        rest = rest[1:]
    if rest[0] == "namespaces" and len(rest) > 1:
        info.namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    info.parts = rest
    if rest:
        info.resource = rest[0]
    if len(rest) >= 2:
        info.name = rest[1]
    if len(rest) >= 3 and info.verb != "proxy":
        info.subresource = rest[2]
    if not info.name and info.verb == "get":
        _list_options(info, query)
    if info.verb == "delete" and not info.name:
        info.verb = "deletecollection"
    return info


def _list_options(info: RequestInfo, query: Any) -> None:
    """list or watch, and a name from `fieldSelector=metadata.name=...` — only when the ListOptions decode
    (integers parse, selectors parse); otherwise Go falls back to strings.ToLower(first watch value)."""
    decoded = True
    for key in ("limit", "timeoutSeconds"):
        if key in query and not re.fullmatch(r"[+-]?\d+", query.getall(key)[0], re.ASCII):
            decoded = False
    try:
        parse_label_selector(query.get("labelSelector", ""))
    except ApiError:
        decoded = False
    parsed, name = goparse.exact_name(query.get("fieldSelector", ""))
    decoded = decoded and parsed
    if decoded:
        info.verb = "watch" if goparse.go_bool(query, "watch") else "list"
        if name and goparse.valid_segment_name(name):
            info.name = name
    else:
        first = query.getall("watch", [None])[0]
        info.verb = "watch" if first is not None and first.lower() not in ("false", "0") else "list"


GENERIC_MESSAGES = {
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
}


def generic_error(code: int) -> ApiError:
    """apierrors.NewGenericServerResponse without a resource: fixed message, empty details."""
    reason, message = GENERIC_MESSAGES[code]
    return ApiError(code, reason, message, {})


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def forbidden(
    identity_user: str, verb: str, resource: str, group: str, namespace: str, name: str, subresource: str = ""
) -> ApiError:
    """The apiserver's authorization denial: ForbiddenStatusError(forbiddenMessage(attributes))."""
    res = f"{resource}/{subresource}" if subresource else resource
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    inner = f'User "{identity_user}" cannot {verb} resource "{res}" in API group "{group}" {where}'
    qualified = _qualified(resource, group)
    prefix = f'{qualified} "{name}" is forbidden' if name else f"{qualified} is forbidden"
    details: dict[str, Any] = {"name": name, "kind": resource} if name else {"kind": resource}
    if group:
        details["group"] = group
    return ApiError(403, "Forbidden", f"{prefix}: {inner}", details)


def allowed(identity: Identity, verb: str, resource: str, group: str) -> bool:
    """The sandbox's tiny RBAC: members of `readonly` may only read; everyone may ask who they are."""
    if group in ("authentication.k8s.io", "authorization.k8s.io") and verb == "create":
        return True
    if READONLY_GROUP in identity.groups:
        return verb in READONLY_VERBS
    return True


# ---------------------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------------------

_SET_TERM = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s+(in|notin)\s+\((.*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


def parse_label_selector(selector: str) -> list[tuple[str, str, list[str]]]:
    reqs: list[tuple[str, str, list[str]]] = []
    for term in _split_terms(selector):
        m = _SET_TERM.match(term)
        if m:
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            reqs.append((m.group(1), m.group(2), values))
        elif term.startswith("!"):
            reqs.append((term[1:].strip(), "!", []))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            reqs.append((k.strip(), "!=", [v.strip()]))
        elif "==" in term:
            k, v = term.split("==", 1)
            reqs.append((k.strip(), "=", [v.strip()]))
        elif "=" in term:
            k, v = term.split("=", 1)
            reqs.append((k.strip(), "=", [v.strip()]))
        elif re.fullmatch(r"[A-Za-z0-9._/-]+", term):
            reqs.append((term, "exists", []))
        else:
            raise ApiError(
                400, "BadRequest", f"unable to parse requirement: found '{term}', expected: identifier"
            )
    return reqs


def labels_match(reqs: list[tuple[str, str, list[str]]], labels: dict[str, str]) -> bool:
    for key, op, values in reqs:
        has = key in labels
        val = labels.get(key)
        if (
            (op == "=" and val != values[0])
            or (op == "!=" and has and val == values[0])
            or (op == "in" and val not in values)
            or (op == "notin" and has and val in values)
            or (op == "exists" and not has)
            or (op == "!" and has)
        ):
            return False
    return True


def parse_field_selector(resource: Resource, selector: str) -> list[tuple[str, str, str]]:
    """fields.ParseSelector (escapes, no trimming; see goparse), then the resource's field label check."""
    allowed_fields = {"metadata.name", "metadata.namespace", *resource.field_selectors}
    terms = goparse.selector_terms(selector)
    if terms is None:
        raise ApiError(400, "BadRequest", f"invalid selector: '{selector}'")
    out = []
    for field_name, op, value in terms:
        if field_name not in allowed_fields:
            raise ApiError(400, "BadRequest", f"field label not supported: {field_name}")
        out.append((field_name, "!=" if op == "!=" else "=", value))
    return out


def _field_value(obj: dict[str, Any], path: str) -> str:
    if path == "source":
        return ((obj.get("source") or {}).get("component")) or ""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(reqs: list[tuple[str, str, str]], obj: dict[str, Any]) -> bool:
    for k, op, v in reqs:
        actual = _field_value(obj, k)
        if (op == "=" and actual != v) or (op == "!=" and actual == v):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Content negotiation
# ---------------------------------------------------------------------------------------------------------


def parse_accept(header: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        pieces = [p.strip() for p in item.split(";")]
        params = {}
        for p in pieces[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                params[k.strip().lower()] = v.strip().strip('"')
        out.append((pieces[0].lower(), params))
    return out


def negotiate(request: web.Request, *, allow_table: bool = True) -> tuple[str, str]:
    """Pick the output form: ("json"|"yaml"|"table"|"pom", meta version) or raise 406 like the apiserver."""
    accept = request.headers.get("Accept", "")
    if not accept.strip():
        return "json", ""
    for media, params in parse_accept(accept):
        if media in ("application/json", "*/*", "application/*", "application/yaml"):
            kind = params.get("as")
            if kind is None:
                return ("yaml" if media == "application/yaml" else "json"), ""
            if params.get("g") != "meta.k8s.io" or params.get("v") not in ("v1", "v1beta1"):
                continue
            if kind == "Table" and allow_table:
                return "table", params["v"]
            if kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
                return "pom", params["v"]
    raise ApiError(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/yaml, "
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )


def json_response(obj: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode() + b"\n",  # Go's json.Encoder adds the newline
        status=status,
        headers={"Content-Type": content_type},
    )


def render(obj: Any, form: str, status: int = 200) -> web.Response:
    if form == "yaml":
        return web.Response(
            body=yaml.safe_dump(obj, sort_keys=False).encode(),
            status=status,
            headers={"Content-Type": "application/yaml"},
        )
    return json_response(obj, status)


def success_status(name: str, resource: Resource, uid: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    if uid:
        details["uid"] = uid
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}


# ---------------------------------------------------------------------------------------------------------
# Fallback runtime (only when the real one cannot be imported)
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The API server
# ---------------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SandboxAPI:
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

    # --- runtime callbacks ----------------------------------------------------------------------------

    def _resolve_secret(self, namespace: str, name: str, key: str) -> str | None:
        obj = self.store.get("/secrets", namespace, name)
        value = ((obj or {}).get("data") or {}).get(key)
        if value is None:
            return None
        return base64.b64decode(value).decode("utf-8", "replace")

    def _resolve_configmap(self, namespace: str, name: str, key: str) -> str | None:
        obj = self.store.get("/configmaps", namespace, name)
        return ((obj or {}).get("data") or {}).get(key)

    # --- lifecycle ------------------------------------------------------------------------------------

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

    # --- middleware: record, authenticate, impersonate, errors -----------------------------------------

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

    def _authenticate(self, request: web.Request) -> Identity | None:
        # Like the apiserver's union authenticator: a verified client certificate first, then a bearer token.
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport else None
        if cert:
            cn = ""
            orgs: list[str] = []
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        cn = value
                    elif key == "organizationName":
                        orgs.append(value)
            if cn:
                return Identity(cn, [*orgs, "system:authenticated"])
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and hmac.compare_digest(token.strip(), self.token):
            return Identity(ADMIN_USER, ["system:masters", "system:authenticated"])
        return None

    def _impersonate(self, request: web.Request, real: Identity) -> Identity | web.Response:
        user = request.headers.get("Impersonate-User")
        groups_h = request.headers.getall("Impersonate-Group", [])
        uid = request.headers.get("Impersonate-Uid")
        extra: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            if k.lower().startswith("impersonate-extra-"):
                extra.setdefault(urllib.parse.unquote(k[len("impersonate-extra-") :]).lower(), []).append(v)
        if user is None:
            if groups_h or uid is not None or extra:
                # The apiserver answers this with a plain-text 500 (responsewriters.InternalError).
                what = ", ".join(
                    [
                        *(f"Group={g}" for g in groups_h),
                        *([f"UID={uid}"] if uid else []),
                        *(f"Extra={k}" for k in extra),
                    ]
                )
                msg = (
                    f'Internal Server Error: "{request.path_qs}": requested [{what}] without impersonating '
                    "a user\n"
                )
                return web.Response(status=500, text=msg, content_type="text/plain")
            return real
        may_impersonate = "system:masters" in real.groups or real.user in (ADMIN_USER, GATEWAY_USER)
        if not may_impersonate:
            raise forbidden(real.user, "impersonate", "users", "", "", user)
        out_groups = list(groups_h)
        if user.startswith("system:serviceaccount:"):
            ns = user.split(":")[2] if user.count(":") >= 3 else ""
            for g in ("system:serviceaccounts", f"system:serviceaccounts:{ns}"):
                if g not in out_groups:
                    out_groups.append(g)
        if user != "system:anonymous" and "system:authenticated" not in out_groups:
            out_groups.append("system:authenticated")
        return Identity(user, out_groups, uid or "", extra)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = self._record(request)
        request[RECORD_KEY] = record
        # Every handler reads the query the way the API server does: Go's url.ParseQuery (first value of a
        # repeated key for `.get`, pairs with `;` or bad escapes dropped), not yarl's reading of it.
        request._cache["query"] = goparse.go_query(request.raw_path.partition("?")[2])
        try:
            real = self._authenticate(request)
            if real is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            record["authenticated_as"] = real.user
            effective = self._impersonate(request, real)
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

    # --- dispatch -----------------------------------------------------------------------------------

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

    # --- admin endpoints ------------------------------------------------------------------------------

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

    # --- non-resource endpoints: discovery, version, health, openapi ----------------------------------

    async def _non_resource(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method not in ("GET", "HEAD"):
            raise generic_error(405)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok", content_type="text/plain")
        if path == "/version":
            return json_response(version_info(), 200)
        if path == "/api":
            if self._wants_aggregated(request):
                return json_response(aggregated_discovery(core=True), 200, AGGREGATED_CT)
            return json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}
                    ],
                }
            )
        if path == "/apis":
            if self._wants_aggregated(request):
                return json_response(aggregated_discovery(core=False), 200, AGGREGATED_CT)
            return json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [api_group(g) for g in ordered_groups()],
                }
            )
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2 and parts[1] == "v1":
            return json_response(resource_list("", "v1"))
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in groups():
            return json_response({"kind": "APIGroup", "apiVersion": "v1", **api_group(parts[1])})
        if parts[0] == "apis" and len(parts) == 3 and parts[1] in groups() and parts[2] in groups()[parts[1]]:
            return json_response(resource_list(parts[1], parts[2]))
        if path == "/openapi/v2":
            accepts = [m for m, _ in parse_accept(request.headers.get("Accept", "application/json"))]
            if not any(m in ("application/json", "*/*", "application/*") for m in accepts):
                # The apiserver would serve protobuf here; the sandbox serves only JSON and says so.
                raise ApiError(
                    406, "NotAcceptable", "only the following media types are accepted: application/json"
                )
            return json_response(openapi.v2_document())
        if path == "/openapi/v3":
            return json_response(openapi.v3_root(self.openapi_docs))
        if path.startswith("/openapi/v3/"):
            doc = self.openapi_docs.get(path[len("/openapi/v3/") :])
            if doc is not None:
                etag = '"' + hashlib.sha512(doc).hexdigest().upper() + '"'
                headers = {"Content-Type": "application/json", "Etag": etag}
                if request.query.get("hash"):
                    headers["Cache-Control"] = "public, immutable"
                return web.Response(body=doc, headers=headers)
        if path in ("/", ""):
            return json_response(
                {
                    "paths": sorted(
                        [
                            "/api",
                            "/api/v1",
                            "/apis",
                            "/healthz",
                            "/livez",
                            "/readyz",
                            "/version",
                            "/openapi/v2",
                            "/openapi/v3",
                        ]
                        + [f"/apis/{g}" for g in groups() if g]
                    )
                }
            )
        raise generic_error(404)

    @staticmethod
    def _wants_aggregated(request: web.Request) -> bool:
        for media, params in parse_accept(request.headers.get("Accept", "")):
            if (
                params.get("as") == "APIGroupDiscoveryList"
                and params.get("g") == "apidiscovery.k8s.io"
                and (params.get("v") == "v2")
            ):
                return True
            if media == "application/json" and "as" not in params:
                return False
        return False

    # --- bodies ---------------------------------------------------------------------------------------

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

    # --- reads --------------------------------------------------------------------------------------

    def _require_namespace(self, ns: str) -> None:
        if self.store.get("/namespaces", "", ns) is None:
            raise not_found("namespaces", ns)

    def _get_or_404(self, resource: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.store.get(resource.key, ns, name)
        if obj is None:
            raise not_found(resource.plural, name, resource.group)
        return obj

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

    # --- writes -------------------------------------------------------------------------------------

    @staticmethod
    def _dry_run(request: web.Request) -> bool:
        values = request.query.getall("dryRun", [])
        for v in values:
            if v != "All":
                raise ApiError(
                    400, "BadRequest", f'dryRun: Unsupported value: "{v}": supported values: "All"'
                )
        return bool(values)

    async def _create(
        self, request: web.Request | None, resource: Resource, ns: str, obj: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        dry = self._dry_run(request) if request is not None else False
        return await self.create_object(resource, ns, obj, dry_run=dry), True

    async def create_object(
        self, resource: Resource, ns: str, obj: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if resource.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and ns and body_ns != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns or body_ns or ""
            self._require_namespace(meta["namespace"])
        else:
            meta.pop("namespace", None)
        for server_field in (
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "selfLink",
            "managedFields",
        ):
            meta.pop(server_field, None)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(
                    secrets.choice(GENERATE_ALPHABET) for _ in range(5)
                )
            else:
                raise self._invalid(
                    resource, "", "metadata.name", "Required value", "name or generateName is required"
                )
        problem = validate_name(resource, meta["name"])
        if problem:
            raise self._invalid(
                resource, meta["name"], "metadata.name", f'Invalid value: "{meta["name"]}"', problem
            )
        self._prepare(resource, obj, None)
        if resource.group in ("apps", "batch") or resource.kind == "Pod":
            meta["generation"] = 1  # only kinds whose spec changes are tracked get a generation
        else:
            meta.pop("generation", None)
        if dry_run:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_iso()
            meta.setdefault("generation", 1)
            if self.store.get(resource.key, meta.get("namespace", ""), meta["name"]) is not None:
                raise self._exists(resource, meta["name"])
            return obj
        try:
            stored = self.store.create(resource.key, obj)
        except KeyError as exc:
            raise self._exists(resource, meta["name"]) from exc
        await self._after_create(resource, stored)
        return self.store.get(resource.key, meta.get("namespace", ""), meta["name"]) or stored

    @staticmethod
    def _exists(resource: Resource, name: str) -> ApiError:
        details: dict[str, Any] = {"name": name, "kind": resource.plural}
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            409,
            "AlreadyExists",
            f'{_qualified(resource.plural, resource.group)} "{name}" already exists',
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

    def _prepare(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Defaulting and strategy hooks (PrepareForCreate/Update) for the kinds that have them."""
        meta = obj["metadata"]
        if old is not None:
            for keep in ("uid", "creationTimestamp", "generation"):
                if keep in old["metadata"]:
                    meta[keep] = old["metadata"][keep]
            if resource.has_status:
                if "status" in old:
                    obj["status"] = old["status"]
                else:
                    obj.pop("status", None)
            strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if strip(obj) != strip(old) and "generation" in old["metadata"]:
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        kind = resource.kind
        if kind == "Secret":
            self._prepare_secret(resource, obj)
        elif kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = (old or {}).get("status") or {"phase": "Active"}
        elif kind == "Pod":
            self._prepare_pod(resource, obj, old)
        elif kind == "Service":
            self._prepare_service(obj, old)
        elif kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            _workload_status(obj)
        elif kind == "Job" and old is None:
            obj["status"] = {
                "startTime": now_iso(),
                "active": 1,
                "ready": 1,
                "terminating": 0,
                "uncountedTerminatedPods": {},
            }
        elif kind == "CronJob" and old is None:
            obj["status"] = {}
            obj.setdefault("spec", {}).setdefault("suspend", False)

    def _prepare_secret(self, resource: Resource, obj: dict[str, Any]) -> None:
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise ApiError(400, "BadRequest", "Secret.data must be a map of base64 strings")
        for key, value in data.items():
            try:
                base64.b64decode(value or "", validate=True)
            except (ValueError, TypeError) as exc:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'Secret in version "v1" cannot be handled as a Secret: illegal '
                    f"base64 data for key {key!r}",
                ) from exc
        # stringData is write-only: merged into data (base64) and never stored, like the apiserver.
        string_data = obj.pop("stringData", None) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        if data:
            obj["data"] = data
        obj.setdefault("type", "Opaque")

    def _prepare_pod(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        spec = obj.setdefault("spec", {})
        containers = spec.get("containers")
        if not containers:
            raise self._invalid(resource, obj["metadata"]["name"], "spec.containers", "Required value", "")
        if old is not None:
            # Ephemeral containers are added through pods/NAME/ephemeralcontainers only (a rule on that
            # subresource must not be side-stepped by writing the pod itself).
            if spec.get("ephemeralContainers") != (old.get("spec") or {}).get("ephemeralContainers"):
                raise self._invalid(
                    resource,
                    obj["metadata"]["name"],
                    "spec",
                    "Forbidden",
                    "pod updates may not change fields other than `spec.containers[*].image`, ... "
                    "(ephemeral containers are added through the ephemeralcontainers subresource)",
                )
            return
        if spec.get("ephemeralContainers"):
            raise self._invalid(
                resource,
                obj["metadata"]["name"],
                "spec.ephemeralContainers",
                "Forbidden",
                "cannot be set on create",
            )
        for c in containers:
            if not c.get("name"):
                raise self._invalid(
                    resource, obj["metadata"]["name"], "spec.containers[0].name", "Required value", ""
                )
            image = c.get("image", "")
            _container_defaults(c, image)
            for p in c.get("ports") or []:
                p.setdefault("protocol", "TCP")
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("securityContext", {})
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("nodeName", NODE_NAME)
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec.setdefault("priority", 0)
        spec.setdefault(
            "tolerations",
            [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
        )
        self._ip_counter += 1
        ip = f"10.244.{self._ip_counter // 250}.{self._ip_counter % 250 + 2}"
        started = now_iso()
        obj["status"] = {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": started}
                for t in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "Ready",
                    "ContainersReady",
                    "PodScheduled",
                )
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started,
            "containerStatuses": [
                _container_status(c, {"running": {"startedAt": started}}) for c in containers
            ],
            "qosClass": "BestEffort",
        }

    def _prepare_service(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if old is not None and (old.get("spec") or {}).get("clusterIP"):
            spec.setdefault("clusterIP", old["spec"]["clusterIP"])
        if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
            self._svc_counter += 1
            spec["clusterIP"] = str(ipaddress.ip_address("10.96.0.0") + self._svc_counter)
        if spec.get("clusterIP"):
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        obj["status"] = (old or {}).get("status") or {"loadBalancer": {}}

    async def _after_create(self, resource: Resource, obj: dict[str, Any]) -> None:
        if resource.kind != "Pod":
            return
        await self.runtime.start_pod(obj)
        meta = obj["metadata"]
        self._record_event(
            obj,
            "Scheduled",
            f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE_NAME}",
            "default-scheduler",
            "",
        )
        for c in obj["spec"]["containers"]:
            for reason, message, component in (
                ("Pulled", f'Container image "{c.get("image", "")}" already present on machine', "kubelet"),
                ("Created", f"Created container: {c['name']}", "kubelet"),
                ("Started", f"Started container {c['name']}", "kubelet"),
            ):
                self._record_event(obj, reason, message, component, f"spec.containers{{{c['name']}}}")
        self._refresh_pod_status(meta["namespace"], meta["name"])

    def _record_event(
        self, obj: dict[str, Any], reason: str, message: str, component: str, fieldpath: str
    ) -> None:
        meta = obj["metadata"]
        ts = now_iso()
        event = {
            "kind": "Event",
            "apiVersion": "v1",
            # Like client-go's recorder: name.<hex unix nanos>, so names sort in creation order.
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": obj["kind"],
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": obj["apiVersion"],
                "resourceVersion": meta["resourceVersion"],
                **({"fieldPath": fieldpath} if fieldpath else {}),
            },
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
            "type": "Normal",
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        with contextlib.suppress(KeyError):
            self.store.create("/events", event)

    def _refresh_pod_status(self, ns: str, name: str) -> None:
        """What the kubelet does: report the containers' real states (a crashed command shows up)."""
        pod = self.store.get("/pods", ns, name)
        if pod is None:
            return
        status = pod.get("status") or {}
        old = status.get("containerStatuses") or []
        new = []
        for c in pod["spec"]["containers"]:
            state = self.runtime.container_state(ns, name, c["name"])
            prev = next((s for s in old if s.get("name") == c["name"]), None)
            if prev is not None and _state_sig(prev.get("state")) == _state_sig(state):
                new.append(prev)
            else:
                new.append(_container_status(c, state))
        ephemeral = self._ephemeral_statuses(pod, status)
        if new == old and ephemeral == status.get("ephemeralContainerStatuses"):
            return
        status["containerStatuses"] = new
        if ephemeral is not None:
            status["ephemeralContainerStatuses"] = ephemeral
        all_ready = all(s.get("ready") for s in new)
        if all("terminated" in (s.get("state") or {}) for s in new):
            failed = any(s["state"]["terminated"].get("exitCode") for s in new)
            status["phase"] = "Failed" if failed else "Succeeded"
        for cond in status.get("conditions") or []:
            if cond["type"] in ("Ready", "ContainersReady"):
                value = "True" if all_ready else "False"
                if cond["status"] != value:
                    cond["status"] = value
                    cond["lastTransitionTime"] = now_iso()
                    if value == "False":
                        cond["reason"] = (
                            "ContainersNotReady" if cond["type"] == "ContainersReady" else "PodCompleted"
                        )
        pod["status"] = status
        self.store.update("/pods", pod)

    def _ephemeral_statuses(self, pod: dict[str, Any], status: dict[str, Any]) -> list[dict[str, Any]] | None:
        """status.ephemeralContainerStatuses (kubectl debug -it waits for its container to run); never ready."""
        specs = pod["spec"].get("ephemeralContainers") or []
        if not specs:
            return None
        meta = pod["metadata"]
        old = status.get("ephemeralContainerStatuses") or []
        out = []
        for c in specs:
            state = self.runtime.container_state(meta["namespace"], meta["name"], c["name"])
            prev = next((s for s in old if s.get("name") == c["name"]), None)
            if prev is not None and _state_sig(prev.get("state")) == _state_sig(state):
                out.append(prev)
            else:
                out.append({**_container_status(c, state), "ready": False})
        return out

    async def _kubelet(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                for pod in self.store.list("/pods"):
                    self._refresh_pod_status(pod["metadata"]["namespace"], pod["metadata"]["name"])
            except Exception:  # keep the loop alive; a status glitch must not stop status reporting
                log.exception("pod status refresh failed")

    def _conflict(self, resource: Resource, name: str) -> ApiError:
        details: dict[str, Any] = {"name": name, "kind": resource.plural}
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {_qualified(resource.plural, resource.group)} "{name}": the object '
            "has been modified; please apply your changes to the latest version and try again",
            details,
        )

    async def _update(
        self,
        request: web.Request,
        resource: Resource,
        ns: str,
        name: str,
        obj: dict[str, Any],
        *,
        status_only: bool = False,
    ) -> dict[str, Any]:
        old = self._get_or_404(resource, ns, name)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("name") and meta["name"] != name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
            )
        body_ns = meta.get("namespace")
        if resource.namespaced and body_ns and body_ns != ns:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        meta["name"] = name
        if resource.namespaced:
            meta["namespace"] = ns
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise self._conflict(resource, name)
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        if status_only:
            new = copy.deepcopy(old)
            new["status"] = obj.get("status", {})
            obj = new
        else:
            for keep in ("uid", "creationTimestamp", "deletionTimestamp"):
                if keep in old["metadata"]:
                    meta[keep] = old["metadata"][keep]
            meta.pop("managedFields", None)
            if (
                resource.kind == "Secret"
                and old.get("immutable")
                and (obj.get("data") != old.get("data") or obj.get("stringData"))
            ):
                raise self._invalid(
                    resource, name, "data", "Forbidden", "field is immutable when `immutable` is set"
                )
            self._prepare(resource, obj, old)
        if self._dry_run(request):
            return obj
        if obj == old:
            return old  # a no-op write does not bump the resourceVersion (etcd guaranteed-update semantics)
        return self.store.update(resource.key, obj)

    async def _patch(
        self, request: web.Request, resource: Resource, ns: str, name: str, status_only: bool = False
    ) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        raw = await self._read_body(request)
        apply = ctype == "application/apply-patch+yaml"
        try:
            patch = yaml.safe_load(raw) if apply else json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(400, "BadRequest", f"error decoding patch: {exc}") from exc
        if ctype not in (
            "application/merge-patch+json",
            "application/json-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ):
            raise ApiError(
                415, "UnsupportedMediaType", f'the server does not support patch content type "{ctype}"'
            )
        if apply:
            if not request.query.get("fieldManager"):
                raise ApiError(
                    422,
                    "Invalid",
                    'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required '
                    "value: is required for apply patch",
                )
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "apply patch must be an object")
            self._check_kind(resource, patch)
        current = self.store.get(resource.key, ns, name)
        if current is None:
            if apply and not status_only:
                body = copy.deepcopy(patch)
                body.setdefault("metadata", {})["name"] = name
                obj, _ = await self._create(request, resource, ns, body)
                return json_response(obj, 201)
            raise not_found(resource.plural, name, resource.group)
        if ctype == "application/merge-patch+json":
            patched = merge_patch(current, patch)
        elif ctype == "application/json-patch+json":
            patched = json_patch(current, patch)
        else:
            patched = strategic_merge_patch(current, patch)
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patched object is not an object")
        patched_rv = (patched.get("metadata") or {}).get("resourceVersion")
        if patched_rv and patched_rv != current["metadata"]["resourceVersion"]:
            raise self._conflict(resource, name)
        if (patched.get("metadata") or {}).get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        return json_response(
            await self._update(request, resource, ns, name, patched, status_only=status_only)
        )

    async def _delete(
        self, request: web.Request, resource: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        options: dict[str, Any] = {}
        raw = await self._read_body(request)
        if raw.strip():
            try:
                options = json.loads(raw)
            except ValueError:
                if request.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
                    options = {}  # DeleteOptions in protobuf: only the defaults matter here
                else:
                    raise ApiError(400, "BadRequest", "DeleteOptions body is not valid JSON") from None
        obj = self._get_or_404(resource, ns, name)
        _check_preconditions(options, obj)
        dry = self._dry_run(request) or options.get("dryRun") == ["All"]
        if dry:
            return json_response(
                obj
                if resource.returns_deleted_object
                else success_status(name, resource, obj["metadata"]["uid"])
            )
        deleted = await self.delete_object(resource, ns, name)
        if resource.returns_deleted_object:
            return json_response(deleted)
        return json_response(success_status(name, resource, deleted["metadata"]["uid"]))

    async def delete_object(self, resource: Resource, ns: str, name: str) -> dict[str, Any]:
        if resource.kind == "Namespace":
            # The namespace controller's job, done synchronously: empty the namespace, then remove it.
            obj = self._get_or_404(resource, ns, name)
            obj["metadata"]["deletionTimestamp"] = now_iso()
            obj["status"] = {"phase": "Terminating"}
            self.store.update(resource.key, obj)
            for r in RESOURCES:
                if r.namespaced and not r.virtual:
                    for child in self.store.list(r.key, name):
                        await self.delete_object(r, name, child["metadata"]["name"])
            return self.store.delete(resource.key, "", name)
        if resource.kind == "Pod":
            await self.runtime.stop_pod(ns, name)
        current = self.store.get(resource.key, ns, name)
        if current is None:
            raise not_found(resource.plural, name, resource.group)
        obj = current
        if resource.kind == "Pod":
            obj["metadata"]["deletionTimestamp"] = now_iso()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            obj = self.store.update(resource.key, obj)
        return self.store.delete(resource.key, ns, name)

    async def _delete_collection(
        self, request: web.Request, resource: Resource, ns: str
    ) -> web.StreamResponse:
        items, _ = self._selected(request, resource, ns)
        dry = self._dry_run(request)
        deleted = []
        for obj in items:
            name = obj["metadata"]["name"]
            deleted.append(obj if dry else await self.delete_object(resource, ns, name))
        for o in deleted:
            o.pop("kind", None)
            o.pop("apiVersion", None)
        return json_response(
            {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.store.revision)},
                "items": deleted,
            }
        )

    # --- virtual resources ----------------------------------------------------------------------------

    async def _review(
        self, request: web.Request, resource: Resource, identity: Identity
    ) -> web.StreamResponse:
        body = await self._read_object(request, resource)
        out: dict[str, Any] = {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"creationTimestamp": None},
        }
        if resource.kind == "SelfSubjectReview":
            out["status"] = {"userInfo": identity.user_info()}
        elif resource.kind == "SelfSubjectRulesReview":
            # `kubectl auth can-i --list`: the tiny RBAC as rules.
            out["spec"] = body.get("spec") or {}
            verbs = sorted(READONLY_VERBS) if READONLY_GROUP in identity.groups else ["*"]
            out["status"] = {
                "resourceRules": [
                    {
                        "verbs": ["create"],
                        "apiGroups": ["authentication.k8s.io"],
                        "resources": ["selfsubjectreviews"],
                    },
                    {
                        "verbs": ["create"],
                        "apiGroups": ["authorization.k8s.io"],
                        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    },
                    {"verbs": verbs, "apiGroups": ["*"], "resources": ["*"]},
                ],
                "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["*"]}],
                "incomplete": False,
            }
        else:
            spec = body.get("spec") or {}
            out["spec"] = spec
            attrs = spec.get("resourceAttributes")
            if attrs:
                ok = allowed(
                    identity, attrs.get("verb", ""), attrs.get("resource", ""), attrs.get("group", "")
                )
            else:
                ok = True  # non-resource URLs (discovery, /healthz) are open to every authenticated user
            # RBAC denies without a reason (kubectl then prints a bare "no").
            out["status"] = {"allowed": ok}
        return json_response(out, 201)

    # --- subresources -------------------------------------------------------------------------------

    async def _subresource(
        self, request: web.Request, resource: Resource, info: RequestInfo
    ) -> web.StreamResponse:
        sub = info.subresource
        if sub not in {s.name for s in resource.subresources}:
            raise generic_error(404)
        if sub == "proxy":  # the only subresource with a path of its own after it
            return await self._proxy(request, resource, info)
        if len(info.parts) > 3:
            raise generic_error(404)
        ns, name = (info.namespace if resource.namespaced else ""), info.name
        method = request.method
        if sub == "eviction":
            if method != "POST":
                raise generic_error(405)
            return await self._evict(request, resource, ns, name)
        if sub == "ephemeralcontainers":
            return await self._ephemeral_containers(request, resource, ns, name)
        if sub in ("exec", "attach", "portforward"):
            return await self._stream(request, resource, ns, name, sub)
        if sub == "log":
            return await self._logs(request, ns, name)
        if sub == "status":
            if method == "GET":
                return await self._get(request, resource, ns, name)
            if method == "PUT":
                body = await self._read_object(request, resource)
                return json_response(await self._update(request, resource, ns, name, body, status_only=True))
            if method == "PATCH":
                return await self._patch(request, resource, ns, name, status_only=True)
        if sub == "scale":
            return await self._scale(request, resource, ns, name)
        if sub == "token" and method == "POST":
            return await self._token(request, ns, name)
        if sub == "finalize" and method == "PUT":
            body = await self._read_object(request, resource)
            return json_response(await self._update(request, resource, "", name, body))
        raise generic_error(405)

    async def _stream(
        self, request: web.Request, resource: Resource, ns: str, name: str, sub: str
    ) -> web.StreamResponse:
        pod = self._get_or_404(resource, ns, name)
        from . import streams  # WebSocket and SPDY/3.1 upgrades, as the API server serves both

        handler = {
            "exec": streams.handle_exec,
            "attach": streams.handle_attach,
            "portforward": streams.handle_portforward,
        }[sub]
        return await handler(request, self.runtime, pod)

    async def _logs(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self._get_or_404(lookup("", "v1", "pods"), ns, name)  # type: ignore[arg-type]
        q = request.query
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        # Any container of the pod may be named, ephemeral ones (kubectl debug) included.
        named = containers + [
            c["name"] for key in ("initContainers", "ephemeralContainers") for c in pod["spec"].get(key) or []
        ]
        container = q.get("container")
        if not container:
            if len(containers) != 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one "
                    f"of: [{' '.join(containers)}]",
                )
            container = containers[0]
        elif container not in named:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if goparse.go_bool(q, "previous"):
            raise ApiError(
                400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found'
            )

        def _int(key: str) -> int | None:
            v = q.get(key)
            if v is None or v == "":
                return None
            try:
                return int(v)
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"{key}: Invalid value: {v!r}") from exc

        follow = goparse.go_bool(q, "follow")
        chunks = self.runtime.stream_logs(
            ns,
            name,
            container,
            follow=follow,
            tail_lines=_int("tailLines"),
            timestamps=goparse.go_bool(q, "timestamps"),
            limit_bytes=_int("limitBytes"),
        )
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/plain", "Cache-Control": "no-cache, private"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def pump() -> None:
            async for chunk in chunks:
                await resp.write(chunk)

        task = asyncio.create_task(pump())
        try:
            # A follow stream ends when the client leaves; the runtime's iterator would otherwise wait forever.
            while not task.done():
                await asyncio.wait({task}, timeout=2.0)
                if request.transport is None or request.transport.is_closing():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        finally:
            if not task.done():
                task.cancel()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _scale(
        self, request: web.Request, resource: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        obj = self._get_or_404(resource, ns, name)

        def scale_of(o: dict[str, Any]) -> dict[str, Any]:
            sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            return {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {
                    k: o["metadata"][k]
                    for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                    if k in o["metadata"]
                },
                "spec": {"replicas": (o.get("spec") or {}).get("replicas", 1)},
                "status": {
                    "replicas": (o.get("status") or {}).get("replicas", 0),
                    "selector": ",".join(f"{k}={v}" for k, v in sorted(sel.items())),
                },
            }

        if request.method == "GET":
            return json_response(scale_of(obj))
        if request.method in ("PUT", "PATCH"):
            raw = await self._read_body(request)
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"invalid body: {exc}") from exc
            current = scale_of(obj)
            ctype = request.headers.get("Content-Type", "").split(";")[0]
            if request.method == "PUT":
                new = body
            elif ctype == "application/json-patch+json":
                new = json_patch(current, body)
            else:
                new = merge_patch(current, body)
            replicas = (new.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(
                    422,
                    "Invalid",
                    f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid '
                    "value: must be greater than or equal to 0",
                )
            obj.setdefault("spec", {})["replicas"] = replicas
            updated = await self._update(request, resource, ns, name, obj)
            return json_response(scale_of(updated))
        raise generic_error(405)

    async def _token(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        sa = self._get_or_404(lookup("", "v1", "serviceaccounts"), ns, name)  # type: ignore[arg-type]
        raw = await self._read_body(request)
        body: dict[str, Any] = {}
        if raw.startswith(protobuf.MAGIC):
            try:
                body = protobuf.decode_body(raw)
            except protobuf.ProtobufError:
                body = {}
        elif raw.strip():
            body = json.loads(raw)
        spec = body.get("spec") or {}
        expiration = int(spec.get("expirationSeconds") or 3600)
        now = int(time.time())

        def b64(d: dict[str, Any]) -> str:
            return (
                base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).decode().rstrip("=")
            )

        claims = {
            "aud": spec.get("audiences") or ["https://kubernetes.default.svc"],
            "exp": now + expiration,
            "iat": now,
            "iss": "https://kubernetes.default.svc",
            "sub": f"system:serviceaccount:{ns}:{name}",
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]},
            },
        }
        token = (
            f"{b64({'alg': 'RS256', 'kid': 'sandbox'})}.{b64(claims)}.{b64({'sig': secrets.token_hex(16)})}"
        )
        exp_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + expiration))
        return json_response(
            {
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": None},
                "spec": {"audiences": claims["aud"], "expirationSeconds": expiration, "boundObjectRef": None},
                "status": {"token": token, "expirationTimestamp": exp_iso},
            },
            201,
        )

    # --- routes that reach containers or end pods without the delete verb ------------------------------

    async def _proxy(self, request: web.Request, resource: Resource, info: RequestInfo) -> web.StreamResponse:
        """pods/NAME/proxy[/PATH] and services/NAME/proxy[/PATH] (NAME may be NAME:PORT or SCHEME:NAME:PORT)."""
        from . import proxy

        ns = info.namespace
        what = "pod" if resource.kind == "Pod" else "service"
        split = proxy.split_scheme_name_port(info.name)
        if split is None:
            raise ApiError(400, "BadRequest", f"invalid {what} request {info.name!r}".replace("'", '"'))
        scheme, name, port = split
        obj = self._get_or_404(resource, ns, name)
        # After api/v1/namespaces/NS/RESOURCE/NAME/proxy: the container's path, from the path as Go decodes it.
        prefix = len([p for p in info.path.split("/") if p]) - len(info.parts) + 3
        path = proxy.upstream_path(info.path, proxy.subpath_index(info.path, prefix))
        if resource.kind == "Pod":
            port = proxy.pod_port(obj, port)
            ip = (obj.get("status") or {}).get("podIP") or ""
            if not ip:
                raise ApiError(400, "BadRequest", "address not allowed")
            address = self.runtime.port_address(ns, name, int(port)) if port.isdigit() else None
            return await proxy.forward(request, address, scheme, ip, port or "80", path)
        pods = self.store.list("/pods", ns)
        pod, target = proxy.service_endpoint(obj, pods, info.name, name, port)
        ip = (pod.get("status") or {}).get("podIP") or ""
        address = self.runtime.port_address(ns, pod["metadata"]["name"], target)
        return await proxy.forward(request, address, scheme, ip, str(target), path)

    async def _evict(
        self, request: web.Request, resource: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        """POST pods/NAME/eviction (pkg/registry/core/pod/storage/eviction.go): a policy/v1 (or v1beta1)
        Eviction deletes the pod, answering 201 with a Success Status. The sandbox has no
        PodDisruptionBudgets, so every eviction of an existing pod is allowed."""
        raw = await self._read_body(request)
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        try:
            body = protobuf.decode_body(raw) if raw.startswith(protobuf.MAGIC) else json.loads(raw or b"null")
        except protobuf.UnsupportedKind as exc:
            raise ApiError(415, "UnsupportedMediaType", str(exc)) from exc
        except (ValueError, KeyError) as exc:
            raise ApiError(
                400, "BadRequest", f"the body of the request was not valid {ctype}: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be an Eviction object")
        if body.get("kind", "Eviction") != "Eviction" or body.get("apiVersion", "policy/v1") not in (
            "policy/v1",
            "policy/v1beta1",
        ):
            raise ApiError(
                400,
                "BadRequest",
                f"the body of the request is a {body.get('apiVersion')}, Kind={body.get('kind')}, "
                "not a policy/v1, Kind=Eviction",
            )
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
        if meta.get("namespace") and meta["namespace"] != ns:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        pod = self._get_or_404(resource, ns, name)
        options = body.get("deleteOptions") or {}
        _check_preconditions(options, pod)
        dry_run = self._dry_run(request) or options.get("dryRun") == ["All"]
        if not dry_run:
            await self.delete_object(resource, ns, name)
        return json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, 201
        )

    async def _ephemeral_containers(
        self, request: web.Request, resource: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        """pods/NAME/ephemeralcontainers: GET the pod; PUT a pod or PATCH it (kubectl debug sends a strategic
        merge patch) to add ephemeral containers. Only spec.ephemeralContainers is taken from the new pod
        (dropNonEphemeralContainerUpdates); existing ones may be neither changed nor removed."""
        current = self._get_or_404(resource, ns, name)
        method = request.method
        if method == "GET":
            return json_response(current)
        if method == "PUT":
            new = await self._read_object(request, resource)
            meta = new.get("metadata") or {}
            if meta.get("name") and meta["name"] != name:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
                )
        elif method == "PATCH":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            raw = await self._read_body(request)
            try:
                patch = json.loads(raw or b"null")
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"error decoding patch: {exc}") from exc
            if ctype == "application/merge-patch+json":
                new = merge_patch(current, patch)
            elif ctype == "application/json-patch+json":
                new = json_patch(current, patch)
            elif ctype == "application/strategic-merge-patch+json":
                new = strategic_merge_patch(current, patch)
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f'the server does not support patch content type "{ctype}"'
                )
            if not isinstance(new, dict):
                raise ApiError(422, "Invalid", "the patched object is not an object")
        else:
            raise generic_error(405)
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise self._conflict(resource, name)
        wanted = (new.get("spec") or {}).get("ephemeralContainers") or []
        added = self._check_ephemeral(current, wanted)
        updated = copy.deepcopy(current)
        updated["spec"]["ephemeralContainers"] = wanted
        if self._dry_run(request):
            return json_response(updated)
        if wanted == (current["spec"].get("ephemeralContainers") or []):
            return json_response(current)
        stored = self.store.update(resource.key, updated)
        for spec in added:
            for reason, message in (
                ("Pulled", f'Container image "{spec.get("image", "")}" already present on machine'),
                ("Created", f"Created container: {spec['name']}"),
                ("Started", f"Started container {spec['name']}"),
            ):
                self._record_event(
                    stored, reason, message, "kubelet", f"spec.ephemeralContainers{{{spec['name']}}}"
                )
            await self.runtime.start_ephemeral(ns, name, spec)
        self._refresh_pod_status(ns, name)
        return json_response(self.store.get(resource.key, ns, name) or stored)

    def _check_ephemeral(self, pod: dict[str, Any], wanted: Any) -> list[dict[str, Any]]:
        """ValidatePodEphemeralContainersUpdate, the parts that matter here; returns the new containers
        (with the defaults the API server sets)."""
        name = pod["metadata"]["name"]
        pods = lookup("", "v1", "pods")
        assert pods is not None

        def invalid(field_path: str, what: str, detail: str = "") -> ApiError:
            return self._invalid(pods, name, field_path, what, detail)

        if not isinstance(wanted, list) or not all(isinstance(c, dict) for c in wanted):
            raise invalid("spec.ephemeralContainers", "Invalid value", "must be a list of containers")
        existing = {c["name"]: c for c in pod["spec"].get("ephemeralContainers") or []}
        by_name = {c.get("name"): c for c in wanted}
        for old_name, old in existing.items():
            if old_name not in by_name:
                raise invalid(
                    "spec.ephemeralContainers",
                    "Forbidden",
                    f'existing ephemeral containers "{old_name}" may not be removed',
                )
            if by_name[old_name] != old:
                raise invalid(
                    "spec.ephemeralContainers",
                    "Forbidden",
                    f'existing ephemeral containers "{old_name}" may not be changed',
                )
        taken = {c["name"] for key in ("containers", "initContainers") for c in pod["spec"].get(key) or []}
        regular = {c["name"] for c in pod["spec"].get("containers") or []}
        added = []
        seen: set[str] = set()
        for i, c in enumerate(wanted):
            where = f"spec.ephemeralContainers[{i}]"
            cname = c.get("name")
            if not cname:
                raise invalid(f"{where}.name", "Required value")
            if cname in taken or cname in seen:
                raise invalid(f"{where}.name", f'Duplicate value: "{cname}"')
            seen.add(cname)
            if cname in existing:
                continue
            if not c.get("image"):
                raise invalid(f"{where}.image", "Required value")
            for forbidden in ("ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
                if c.get(forbidden):
                    raise invalid(
                        f"{where}.{forbidden}", "Forbidden", "cannot be set for an Ephemeral Container"
                    )
            target = c.get("targetContainerName")
            if target and target not in regular:
                raise invalid(f"{where}.targetContainerName", f'Not found: "{target}"')
            image = c["image"]
            _container_defaults(c, image)
            added.append(c)
        return added


async def _apiserver_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every apiserver response carries (and no Server header, which the apiserver never sends)."""
    response.headers.popall("Server", None)
    response.headers.setdefault("Audit-Id", str(uuid.uuid4()))
    if response.status != 101:
        response.headers.setdefault("Cache-Control", "no-cache, private")


def _container_defaults(container: dict[str, Any], image: str) -> None:
    """The API server's defaults for a container (SetDefaults_Container): pull policy, resources,
    termination message."""
    container.setdefault(
        "imagePullPolicy",
        "Always" if image.endswith(":latest") or ":" not in image.split("/")[-1] else "IfNotPresent",
    )
    container.setdefault("resources", {})
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")


def _check_preconditions(options: dict[str, Any], obj: dict[str, Any]) -> None:
    """DeleteOptions.preconditions (uid, resourceVersion) against the stored object: 409 as the API server."""
    pre = options.get("preconditions") or {}
    meta = obj["metadata"]
    if pre.get("uid") and pre["uid"] != meta["uid"]:
        raise ApiError(
            409,
            "Conflict",
            f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
        )
    if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
        raise ApiError(
            409,
            "Conflict",
            f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
            f"ResourceVersion in object meta: {meta['resourceVersion']}",
        )


def _obj_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _state_sig(state: dict[str, Any] | None) -> tuple[Any, ...]:
    state = state or {}
    if "running" in state:
        return ("running",)
    if "terminated" in state:
        return ("terminated", state["terminated"].get("exitCode"))
    return ("waiting", (state.get("waiting") or {}).get("reason"))


def _container_status(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    running = "running" in state
    image = container.get("image", "")
    digest = hashlib.sha256(image.encode()).hexdigest()
    return {
        "name": container["name"],
        "state": state,
        "lastState": {},
        "ready": running,
        "restartCount": 0,
        "image": image,
        "imageID": f"{image.split(':')[0]}@sha256:{digest}",
        "containerID": f"containerd://{hashlib.sha256((container['name'] + str(time.time())).encode()).hexdigest()}",
        "started": running,
    }


def _workload_status(obj: dict[str, Any]) -> None:
    """Controllers are not simulated; workloads report themselves fully rolled out."""
    spec = obj.setdefault("spec", {})
    kind = obj["kind"]
    gen = obj["metadata"].get("generation", 1)
    if kind == "DaemonSet":
        obj["status"] = {
            "currentNumberScheduled": 1,
            "desiredNumberScheduled": 1,
            "numberAvailable": 1,
            "numberMisscheduled": 0,
            "numberReady": 1,
            "observedGeneration": gen,
            "updatedNumberScheduled": 1,
        }
        return
    replicas = spec.setdefault("replicas", 1)
    status: dict[str, Any] = {"observedGeneration": gen, "replicas": replicas}
    if replicas:
        status.update({"readyReplicas": replicas, "availableReplicas": replicas})
    if kind == "Deployment":
        if not (spec.get("strategy") or {}).get("type"):
            spec["strategy"] = {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            }
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        if replicas:
            status["updatedReplicas"] = replicas
        ts = now_iso()
        status["conditions"] = [
            {
                "type": "Available",
                "status": "True",
                "lastUpdateTime": ts,
                "lastTransitionTime": ts,
                "reason": "MinimumReplicasAvailable",
                "message": "Deployment has minimum availability.",
            },
            {
                "type": "Progressing",
                "status": "True",
                "lastUpdateTime": ts,
                "lastTransitionTime": ts,
                "reason": "NewReplicaSetAvailable",
                "message": f'ReplicaSet "{obj["metadata"]["name"]}-5d8f7c9b6" has successfully progressed.',
            },
        ]
    elif kind == "StatefulSet":
        status.update({"currentReplicas": replicas, "updatedReplicas": replicas})
    elif kind == "ReplicaSet":
        status["fullyLabeledReplicas"] = replicas
    obj["status"] = status


# ---------------------------------------------------------------------------------------------------------
# Discovery documents
# ---------------------------------------------------------------------------------------------------------


def version_info() -> dict[str, str]:
    major, minor = GIT_VERSION[1:].split(".")[:2]
    return {
        "major": major,
        "minor": minor,
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def ordered_groups() -> list[str]:
    gs = [g for g in groups() if g]
    return sorted(gs, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g))


def api_group(name: str) -> dict[str, Any]:
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in groups()[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def _storage_hash(r: Resource) -> str:
    return base64.b64encode(hashlib.sha256(f"{r.api_version}/{r.kind}".encode()).digest()[:8]).decode()


def resource_list(group: str, version: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for r in by_group_version(group, version):
        entry: dict[str, Any] = {
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        if not r.virtual:
            entry["storageVersionHash"] = _storage_hash(r)
        entries.append(entry)
        for sub in r.subresources:
            sub_entry: dict[str, Any] = {
                "name": f"{r.plural}/{sub.name}",
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": sub.kind,
                "verbs": list(sub.verbs),
            }
            if sub.name == "scale":
                sub_entry.update({"group": "autoscaling", "version": "v1"})
            if sub.name == "token":
                sub_entry.update({"group": "authentication.k8s.io", "version": "v1"})
            if sub.name == "eviction":
                sub_entry.update({"group": "policy", "version": "v1"})
            entries.append(sub_entry)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": entries,
    }


def _aggregated_resource(r: Resource) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": "Namespaced" if r.namespaced else "Cluster",
        "singularResource": r.singular,
        "verbs": list(r.verbs),
    }
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    if r.subresources:
        subs = []
        for sub in r.subresources:
            kind = {"group": r.group, "version": r.version, "kind": sub.kind}
            if sub.name == "scale":
                kind = {"group": "autoscaling", "version": "v1", "kind": "Scale"}
            elif sub.name == "token":
                kind = {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"}
            elif sub.name == "eviction":
                kind = {"group": "policy", "version": "v1", "kind": "Eviction"}
            subs.append({"subresource": sub.name, "responseKind": kind, "verbs": list(sub.verbs)})
        entry["subresources"] = subs
    return entry


def aggregated_discovery(*, core: bool) -> dict[str, Any]:
    """apidiscovery.k8s.io/v2 APIGroupDiscoveryList for /api (core) or /apis (named groups)."""
    names = [""] if core else ordered_groups()
    items = []
    for g in names:
        items.append(
            {
                "metadata": {"name": g, "creationTimestamp": None} if g else {"creationTimestamp": None},
                "versions": [
                    {
                        "version": v,
                        "resources": [_aggregated_resource(r) for r in by_group_version(g, v)],
                        "freshness": "Current",
                    }
                    for v in groups()[g]
                ],
            }
        )
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    }


# ---------------------------------------------------------------------------------------------------------
# Starting a sandbox
# ---------------------------------------------------------------------------------------------------------


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
