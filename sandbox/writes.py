"""Writes: create, update, patch (merge, strategic merge, JSON patch, server-side apply), delete and
deletecollection with dryRun, preconditions and conflicts, and the virtual review resources.
"""

from __future__ import annotations

import copy
import json
import secrets
import uuid
from typing import Any

import yaml
from aiohttp import web

from .auth import (
    READONLY_GROUP,
    READONLY_VERBS,
    Identity,
    allowed,
)
from .kubelet import Kubelet
from .negotiation import json_response, success_status
from .patch import json_patch, merge_patch, strategic_merge_patch
from .reads import Reads
from .resources import RESOURCES, Resource, validate_name
from .store import ApiError, not_found, now_iso
from .strategies import Strategies

GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's SimpleNameGenerator alphabet


class Writes(Reads, Strategies, Kubelet):
    """create, update, patch (merge, strategic, JSON, apply), delete, deletecollection, reviews."""

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
        check_preconditions(options, obj)
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


def check_preconditions(options: dict[str, Any], obj: dict[str, Any]) -> None:
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
