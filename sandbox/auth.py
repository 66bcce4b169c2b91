"""Who a sandbox request is: authentication (client certificate or token), impersonation headers
like the API server, and the sandbox's tiny RBAC (members of `readonly` may only read; members of `view`
may read everything but Secrets, as with Kubernetes' built-in `view` ClusterRole).
"""

from __future__ import annotations

import hmac
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .store import ApiError

ADMIN_USER = "kubegate-admin"
GATEWAY_USER = "kubegate-gateway"
READONLY_GROUP = "readonly"
READONLY_VERBS = {"get", "list", "watch"}
VIEW_GROUP = "view"


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


def qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def forbidden(
    identity_user: str, verb: str, resource: str, group: str, namespace: str, name: str, subresource: str = ""
) -> ApiError:
    """The apiserver's authorization denial: ForbiddenStatusError(forbiddenMessage(attributes))."""
    res = f"{resource}/{subresource}" if subresource else resource
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    inner = f'User "{identity_user}" cannot {verb} resource "{res}" in API group "{group}" {where}'
    what = qualified(resource, group)
    prefix = f'{what} "{name}" is forbidden' if name else f"{what} is forbidden"
    details: dict[str, Any] = {"name": name, "kind": resource} if name else {"kind": resource}
    if group:
        details["group"] = group
    return ApiError(403, "Forbidden", f"{prefix}: {inner}", details)


def allowed(identity: Identity, verb: str, resource: str, group: str) -> bool:
    """The sandbox's tiny RBAC: members of `readonly` may only read, members of `view` may read all but
    Secrets; everyone may ask who they are."""
    if group in ("authentication.k8s.io", "authorization.k8s.io") and verb == "create":
        return True
    if VIEW_GROUP in identity.groups:  # Kubernetes' `view` role: reads, and not Secrets
        return verb in READONLY_VERBS and not (resource == "secrets" and group == "")
    if READONLY_GROUP in identity.groups:
        return verb in READONLY_VERBS
    return True


def authenticate(request: web.Request, token_expected: str) -> Identity | None:
    """The caller's own identity, or None when neither a client certificate nor the token vouches for it."""
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
    if scheme.lower() == "bearer" and token.strip() and hmac.compare_digest(token.strip(), token_expected):
        return Identity(ADMIN_USER, ["system:masters", "system:authenticated"])
    return None


def impersonate(request: web.Request, real: Identity) -> Identity | web.Response:
    """The identity a request acts as: `real`, or whom its Impersonate-* headers name (if `real` may)."""
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
