"""Subresources: status, scale, pod logs, exec/attach/port-forward (sandbox/streams.py), service account
tokens, the pods/services proxy (sandbox/proxy.py), evictions and ephemeral containers (`kubectl debug`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import secrets
import time
from typing import Any

from aiohttp import web

from kubegate.core import protobuf

from . import goparse
from .kubelet import container_defaults
from .negotiation import generic_error, json_response
from .patch import json_patch, merge_patch, strategic_merge_patch
from .requestinfo import RequestInfo
from .resources import Resource, lookup
from .store import ApiError
from .writes import Writes, check_preconditions


class Subresources(Writes):
    """Routes below an object: status, scale, log, exec/attach/portforward, token, proxy, eviction,
    ephemeralcontainers, finalize."""

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
        check_preconditions(options, pod)
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
            container_defaults(c, image)
            added.append(c)
        return added
