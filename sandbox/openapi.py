"""Minimal OpenAPI documents: enough for kubectl's apply/create validation, not for `kubectl explain`.

kubectl (>= 1.27) validates `-f` input by asking whether the server does *server-side* field validation: it
looks in `/openapi/v3/<group-version>` for the PATCH operation of the object's kind
(`x-kubernetes-group-version-kind`) and a `fieldValidation` query parameter. When found it sends
`?fieldValidation=Strict` and skips client-side schema checks. So every resource gets its full set of paths
with the real operation metadata, while the schemas are open (`x-kubernetes-preserve-unknown-fields`).

The PATCH request bodies deliberately do not list `application/strategic-merge-patch+json`: kubectl would
then compute apply patches from these open schemas (which lack patch merge keys) instead of from its
compiled-in types, and print a warning. Without it, kubectl falls back to the compiled-in types, which is
exactly what it does against a real cluster whose OpenAPI it cannot use.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .resources import RESOURCES, Resource, by_group_version, groups

PATCH_TYPES = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]


def gv_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _schema_name(r: Resource) -> str:
    if not r.group:
        return f"io.k8s.api.core.v1.{r.kind}"
    short = r.group.split(".")[0]
    return f"io.k8s.api.{short}.{r.version}.{r.kind}"


def _gvk(r: Resource) -> dict[str, str]:
    return {"group": r.group, "version": r.version, "kind": r.kind}


def _param(name: str, description: str = "", where: str = "query", typ: str = "string") -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "in": where, "schema": {"type": typ, "uniqueItems": True}}
    if description:
        p["description"] = description
    if where == "path":
        p["required"] = True
    return p


FIELD_VALIDATION = _param(
    "fieldValidation",
    "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing "
    "unknown or duplicate fields. Valid values are: Ignore, Warn, Strict.",
)
DRY_RUN = _param("dryRun", "When present, indicates that modifications should not be persisted.")
FIELD_MANAGER = _param(
    "fieldManager", "fieldManager is a name associated with the actor or entity making these changes."
)


def _op(
    r: Resource,
    action: str,
    op_id: str,
    ref: str,
    body: list[str] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [(r.group.split(".")[0] or "core") + "_" + r.version],
        "operationId": op_id,
        "parameters": params or [],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}},
            "401": {"description": "Unauthorized"},
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(r),
    }
    if body:
        op["requestBody"] = {"content": {ct: {"schema": {"$ref": ref}} for ct in body}, "required": True}
    return op


def _camel(r: Resource) -> str:
    g = "".join(p.capitalize() for p in (r.group.split(".")[0] or "core").split("-"))
    return f"{g}{r.version.capitalize()}"


def gv_document(group: str, version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for r in by_group_version(group, version):
        ref = f"#/components/schemas/{_schema_name(r)}"
        schemas[_schema_name(r)] = {
            "description": f"{r.kind} (schema left open by the sandbox).",
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-group-version-kind": [_gvk(r)],
        }
        base = "/" + gv_path(group, version)
        scope = f"{base}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else f"{base}/{r.plural}"
        ns_word = "Namespaced" if r.namespaced else ""
        name = f"{_camel(r)}{ns_word}{r.kind}"
        writes = [DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION]
        collection: dict[str, Any] = {}
        if "create" in r.verbs:
            collection["post"] = _op(r, "post", f"create{name}", ref, ["*/*"], writes)
        if "list" in r.verbs:
            collection["get"] = _op(r, "list", f"list{name}", ref)
        if "deletecollection" in r.verbs:
            collection["delete"] = _op(r, "deletecollection", f"deletecollection{name}", ref)
        if collection:
            if r.namespaced:
                collection["parameters"] = [_param("namespace", where="path")]
            paths[scope] = collection
        if r.virtual:
            continue
        item: dict[str, Any] = {
            "get": _op(r, "get", f"read{name}", ref),
            "put": _op(r, "put", f"replace{name}", ref, ["*/*"], writes),
            "patch": _op(
                r, "patch", f"patch{name}", ref, PATCH_TYPES, [*writes, _param("force", typ="boolean")]
            ),
            "delete": _op(r, "delete", f"delete{name}", ref),
            "parameters": [_param("name", where="path")]
            + ([_param("namespace", where="path")] if r.namespaced else []),
        }
        paths[f"{scope}/{{name}}"] = item
        for sub in r.subresources:
            if sub.name == "status":
                paths[f"{scope}/{{name}}/status"] = {
                    "get": _op(r, "get", f"read{name}Status", ref),
                    "put": _op(r, "put", f"replace{name}Status", ref, ["*/*"], writes),
                    "patch": _op(r, "patch", f"patch{name}Status", ref, PATCH_TYPES, writes),
                }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0-sandbox"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
        },
    }


def _hash(doc: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:128].upper()


def documents() -> dict[str, bytes]:
    """gv path ("api/v1", "apis/apps/v1") -> serialized document."""
    out = {}
    for group, versions in groups().items():
        for version in versions:
            out[gv_path(group, version)] = json.dumps(gv_document(group, version)).encode()
    return out


def v3_root(docs: dict[str, bytes]) -> dict[str, Any]:
    return {
        "paths": {
            path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={hashlib.sha512(body).hexdigest().upper()}"}
            for path, body in sorted(docs.items())
        }
    }


def v2_document() -> dict[str, Any]:
    """A Swagger 2.0 document (JSON only; the apiserver also offers protobuf, which the sandbox does not)."""
    definitions = {}
    paths: dict[str, Any] = {}
    for r in RESOURCES:
        definitions[_schema_name(r)] = {
            "type": "object",
            "x-kubernetes-group-version-kind": [_gvk(r)],
        }
        base = "/" + gv_path(r.group, r.version)
        scope = f"{base}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else f"{base}/{r.plural}"
        paths[scope] = {
            "get": {
                "operationId": f"list{_camel(r)}{r.kind}",
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-group-version-kind": _gvk(r),
                "x-kubernetes-action": "list",
            }
        }
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0-sandbox"},
        "paths": paths,
        "definitions": definitions,
    }
