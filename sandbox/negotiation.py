"""Content negotiation and response bodies: which form the client accepts (JSON, YAML, Table,
PartialObjectMetadata; 406 otherwise), JSON/YAML rendering, and the generic Status answers.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from aiohttp import web

from .resources import Resource
from .store import ApiError


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


GENERIC_MESSAGES = {
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
}


def generic_error(code: int) -> ApiError:
    """apierrors.NewGenericServerResponse without a resource: fixed message, empty details."""
    reason, message = GENERIC_MESSAGES[code]
    return ApiError(code, reason, message, {})
