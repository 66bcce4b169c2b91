"""Discovery (legacy and aggregated), /version, health endpoints and OpenAPI documents."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from aiohttp import web

from . import openapi
from .apibase import ApiBase
from .negotiation import generic_error, json_response, parse_accept
from .requestinfo import RequestInfo
from .resources import GROUP_ORDER, Resource, by_group_version, groups
from .store import ApiError

GIT_VERSION = "v1.32.0-sandbox"
AGGREGATED_CT = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


class Discovery(ApiBase):
    """Non-resource endpoints: discovery, /version, health and OpenAPI."""

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
