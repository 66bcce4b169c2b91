"""The `pods/NAME/proxy[/PATH]` and `services/NAME/proxy[/PATH]` subresources, as the API server serves them.

The API server's ProxyREST (pkg/registry/core/pod/rest/subresources.go, pkg/registry/core/service/proxy.go)
resolves `NAME`, `NAME:PORT` or `SCHEME:NAME:PORT` to one address and hands the request to an
UpgradeAwareProxyHandler. What clients (and a gateway in front) can tell, and what is reproduced here:

* the target: a pod's given port, else its first container's first declared port; a service's port by
  number or name (an unnamed request matches only an unnamed service port), then a random ready pod the
  selector picks and the service port's targetPort (a number or a container port's name);
* the upstream path is the rest of the URL path after `/proxy`, cleaned like Go's `path.Join` (`..` cannot
  climb above the container's root) with a trailing slash kept; an empty one is a 301 to `.../proxy/`;
* the query string is passed on raw, unchanged (`loc.RawQuery = req.URL.RawQuery`);
* the caller's credentials (Authorization, Impersonate-*) never reach the container (the authentication
  and impersonation filters remove them), hop-by-hop headers are dropped, X-Forwarded-* are added;
* errors: 400 for a malformed name, 404 for a missing object, 503 `no endpoints available for service`
  and 503 `error trying to reach service: ...` when nothing answers; 405 for methods ProxyREST lacks.

The sandbox's addresses: pod IPs are not routable here, so a pod port P is reached at the runtime's local
address for P (`PodRuntime.port_address`, see sandbox/runtime.py for how a pod serves it). Not reproduced:
rewriting links in proxied text/html and WebSocket upgrades through the proxy.
"""

from __future__ import annotations

import contextlib
import posixpath
import random
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .store import ApiError

# ProxyREST.ConnectMethods
PROXY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded to the container: consumed by the API server's authentication/impersonation filters.
CREDENTIAL_HEADERS = frozenset({"authorization"})
READ_CHUNK = 64 * 1024


def split_scheme_name_port(ident: str) -> tuple[str, str, str] | None:
    """apimachinery's net.SplitSchemeNamePort: `name`, `name:port`, `scheme:name:port`; None if invalid."""
    parts = ident.split(":")
    if len(parts) == 1:
        scheme, name, port = "", parts[0], ""
    elif len(parts) == 2:
        scheme, name, port = "", parts[0], parts[1]
    elif len(parts) == 3:
        scheme, name, port = parts
    else:
        return None
    if not name or scheme not in ("", "http", "https"):
        return None
    return scheme, name, port


def upstream_path(request_path: str, subpath_start: int) -> str:
    """The path the container sees: the request's (decoded) path after `/proxy`, cleaned as Go's path.Join
    cleans it, keeping a trailing slash (net.JoinPreservingTrailingSlash, then the handler's own check)."""
    rest = request_path.split("/")[subpath_start:]
    sub = "/".join(rest)
    if sub and not sub.startswith("/"):
        sub = "/" + sub
    if not sub:
        return "/" if request_path.endswith("/") else ""
    cleaned = posixpath.normpath(sub)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if sub.endswith("/") and not cleaned.endswith("/"):
        cleaned += "/"
    return cleaned


def subpath_index(request_path: str, prefix_parts: int) -> int:
    """Index in request_path.split('/') where the proxied subpath starts, after `prefix_parts` non-empty
    segments (`api v1 namespaces NS pods NAME proxy`)."""
    seen = 0
    for i, segment in enumerate(request_path.split("/")):
        if segment:
            seen += 1
            if seen == prefix_parts:
                return i + 1
    return len(request_path.split("/"))


def pod_port(pod: dict[str, Any], port: str) -> str:
    """ResourceLocation's port for a pod: the given one, else the first declared port of any container."""
    if port:
        return port
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if "containerPort" in p:
                return str(p["containerPort"])
    return ""


def service_endpoint(
    service: dict[str, Any], pods: list[dict[str, Any]], ident: str, name: str, port: str
) -> tuple[dict[str, Any], int]:
    """The service REST's ResourceLocation over the endpoints the selector would give: (pod, target port)."""
    spec = service.get("spec") or {}
    ports = spec.get("ports") or []
    port_name = port
    if port.isdigit():
        match = next((p for p in ports if str(p.get("port")) == port), None)
        if match is None:
            raise ApiError(503, "ServiceUnavailable", f'no service port {port} found for service "{name}"')
        port_name = match.get("name") or ""
    selector = spec.get("selector") or {}
    ready = [
        p
        for p in pods
        if selector
        and all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())
        and (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    if not ready:
        raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
    svc_port = next((p for p in ports if (p.get("name") or "") == port_name), None)
    if svc_port is not None:
        target = svc_port.get("targetPort", svc_port.get("port"))
        pod = random.choice(ready)
        number = _container_port(pod, target)
        if number is not None:
            return pod, number
    raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{ident}"')


def _container_port(pod: dict[str, Any], target: Any) -> int | None:
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and "containerPort" in p:
                return int(p["containerPort"])
    return None


def unreachable(host: str, port: str, why: str) -> ApiError:
    return ApiError(
        503, "ServiceUnavailable", f"error trying to reach service: dial tcp {host}:{port}: {why}"
    )


def forwarded_headers(request: web.Request, host: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    # Headers the client lists in Connection are hop-by-hop too (Go's ReverseProxy drops them).
    listed = {t.strip().lower() for v in request.headers.getall("Connection", []) for t in v.split(",")}
    for key, value in request.headers.items():
        lower = key.lower()
        if (
            lower in HOP_BY_HOP
            or lower in listed
            or lower in CREDENTIAL_HEADERS
            or lower.startswith("impersonate-")
        ):
            continue
        if lower == "host":
            continue
        headers[key] = value
    peer = request.remote or ""
    previous = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    headers["X-Forwarded-Uri"] = request.raw_path.partition("?")[0]
    headers["X-Forwarded-Host"] = request.host
    headers["X-Forwarded-Proto"] = "https"
    headers["Host"] = host
    return headers


async def forward(
    request: web.Request,
    address: tuple[str, int] | None,
    scheme: str,
    display_host: str,
    display_port: str,
    path: str,
) -> web.StreamResponse:
    """Send the request to `address` and stream the answer back (the UpgradeAwareProxyHandler's job)."""
    if request.method not in PROXY_METHODS:
        raise ApiError(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )
    raw_query = request.raw_path.partition("?")[2]
    if path == "":
        # The handler's redirect for an empty path (issue 4958): to the same URL with a trailing slash.
        location = request.raw_path.partition("?")[0] + "/" + (f"?{raw_query}" if raw_query else "")
        raise web.HTTPMovedPermanently(location)
    if address is None:
        raise unreachable(display_host, display_port, "connect: connection refused")
    target = f"{scheme or 'http'}://{address[0]}:{address[1]}"
    url = target + urllib.parse.quote(path, safe="/$&+,:;=@") + (f"?{raw_query}" if raw_query else "")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    session = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
    try:
        try:
            upstream = await session.request(
                request.method,
                URL(url, encoded=True),
                headers=forwarded_headers(request, f"{display_host}:{display_port}"),
                data=request.content if request.can_read_body else None,
                allow_redirects=False,
                ssl=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise unreachable(display_host, display_port, str(exc) or type(exc).__name__) from exc
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                async for chunk in upstream.content.iter_chunked(READ_CHUNK):
                    await response.write(chunk)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return response
    finally:
        await session.close()
