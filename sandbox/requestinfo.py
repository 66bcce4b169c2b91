"""Request attributes like the API server's RequestInfoFactory: verb, namespace, resource,
subresource and name from a method, the Go-decoded path and the query (its own copy on purpose: it is the
oracle the gateway's parser is tested against).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import goparse
from .selection import parse_label_selector
from .store import ApiError


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
