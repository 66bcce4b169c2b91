"""Kubernetes request attributes, parsed the way the API server parses them.

This mirrors k8s.io/apiserver `RequestInfoFactory.NewRequestInfo` so that policy written against kubegate
means the same thing as RBAC written against the cluster: the same verb (list vs get vs watch,
deletecollection), the same resource/subresource split, the same namespace rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs

API_PREFIXES = frozenset({"api", "apis"})
GROUPLESS_PREFIXES = frozenset({"api"})
# Verbs that appear as the first path part after the version (`/api/v1/watch/pods`); `proxy` too.
SPECIAL_VERBS = frozenset({"proxy", "watch"})
SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
TRUE_VALUES = frozenset({"1", "t", "T", "TRUE", "true", "True"})


@dataclass(slots=True)
class RequestAttributes:
    """What a Kubernetes request does, in the API server's own terms."""

    path: str
    is_resource_request: bool = False
    verb: str = ""
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)

    @property
    def resource_path(self) -> str:
        """`pods/exec`-style resource name used by RBAC and policy rules."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def is_streaming_subresource(self) -> bool:
        return self.resource == "pods" and self.subresource in {"exec", "attach", "portforward"}

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "is_resource_request": self.is_resource_request,
            "verb": self.verb,
            "api_group": self.api_group,
            "api_version": self.api_version,
            "namespace": self.namespace,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
        }


def parse_request(method: str, path: str, query: str) -> RequestAttributes:
    """Parse a (normalised, connection-relative) path and query into request attributes.

    `path` starts with `/` and has already been checked for escapes; `query` is the raw query string.
    Non-resource requests (`/version`, `/openapi/v3`, `/healthz`) get the lower-cased HTTP method as verb.
    """
    info = RequestAttributes(path=path, verb=method.lower())
    current = [p for p in path.strip("/").split("/") if p] if path.strip("/") else []
    if len(current) < 3 or current[0] not in API_PREFIXES:
        return info  # non-resource request
    info.api_prefix = current[0]
    current = current[1:]
    if info.api_prefix not in GROUPLESS_PREFIXES:
        if len(current) < 3:
            return info  # /apis/GROUP/VERSION discovery is a non-resource request
        info.api_group = current[0]
        current = current[1:]
    info.is_resource_request = True
    info.api_version = current[0]
    current = current[1:]

    if current[0] in SPECIAL_VERBS:
        if len(current) < 2:
            raise ValueError(f"unable to determine kind and namespace from url {path}")
        info.verb = current[0]
        current = current[1:]
    else:
        info.verb = METHOD_VERBS.get(method.upper(), method.lower())

    if current[0] == "namespaces":
        if len(current) > 1:
            info.namespace = current[1]
            # /namespaces/NS/RESOURCE... is namespaced; /namespaces/NS[/status|finalize] is the namespace itself
            if len(current) > 2 and current[2] not in NAMESPACE_SUBRESOURCES:
                current = current[2:]
    info.parts = current

    if len(current) >= 3 and info.verb not in SPECIAL_VERBS_NO_SUBRESOURCES:
        info.subresource = current[2]
    if len(current) >= 2:
        info.name = current[1]
    if len(current) >= 1:
        info.resource = current[0]

    if not info.name and info.verb == "get":
        params = parse_qs(query, keep_blank_values=True)
        info.verb = "watch" if params.get("watch", [""])[-1] in TRUE_VALUES else "list"
        for selector in params.get("fieldSelector", []):
            name = _exact_name(selector)
            if name:
                info.name = name
    if not info.name and info.verb == "delete":
        info.verb = "deletecollection"
    return info


def _exact_name(selector: str) -> str:
    """`metadata.name=web` (or `==`) in a field selector names one object, as the API server recognises."""
    for term in selector.split(","):
        for op in ("==", "="):
            key, sep, value = term.partition(op)
            if sep and key.strip() == "metadata.name" and "!" not in key:
                return value.strip()
    return ""
