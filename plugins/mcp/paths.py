"""From a tool's arguments to the API path kubectl would request — validated, so that an argument can only
ever name the object it names (never another resource, namespace or connection)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

# The resources an agent names most, as kubectl's discovery would resolve them: plural → (group/version,
# kind, namespaced). Others are named with `api_version` (`resource` plural, `api_version` `group/version`).
KNOWN: dict[str, tuple[str, str, bool]] = {
    "pods": ("v1", "Pod", True),
    "services": ("v1", "Service", True),
    "configmaps": ("v1", "ConfigMap", True),
    "secrets": ("v1", "Secret", True),
    "serviceaccounts": ("v1", "ServiceAccount", True),
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim", True),
    "endpoints": ("v1", "Endpoints", True),
    "events": ("v1", "Event", True),
    "namespaces": ("v1", "Namespace", False),
    "nodes": ("v1", "Node", False),
    "persistentvolumes": ("v1", "PersistentVolume", False),
    "deployments": ("apps/v1", "Deployment", True),
    "statefulsets": ("apps/v1", "StatefulSet", True),
    "daemonsets": ("apps/v1", "DaemonSet", True),
    "replicasets": ("apps/v1", "ReplicaSet", True),
    "jobs": ("batch/v1", "Job", True),
    "cronjobs": ("batch/v1", "CronJob", True),
    "ingresses": ("networking.k8s.io/v1", "Ingress", True),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy", True),
    "roles": ("rbac.authorization.k8s.io/v1", "Role", True),
    "rolebindings": ("rbac.authorization.k8s.io/v1", "RoleBinding", True),
    "clusterroles": ("rbac.authorization.k8s.io/v1", "ClusterRole", False),
    "clusterrolebindings": ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", False),
}
SHORT_NAMES = {"po": "pods", "svc": "services", "cm": "configmaps", "sa": "serviceaccounts",
               "pvc": "persistentvolumeclaims", "ns": "namespaces", "no": "nodes", "pv": "persistentvolumes",
               "deploy": "deployments", "sts": "statefulsets", "ds": "daemonsets", "rs": "replicasets",
               "cj": "cronjobs", "ing": "ingresses", "netpol": "networkpolicies", "ev": "events"}  # fmt: skip
BY_KIND = {(version, kind): plural for plural, (version, kind, _) in KNOWN.items()}

# The API server's own rules: a namespace is a DNS label; a resource is a lower-case DNS-1123 name; a group
# version is `version` or `group/version`; an object's name is any path segment name (IsValidPathSegmentName:
# not `.` or `..`, no `/` or `%`) — kept to printable ASCII here, and percent-encoded in the path.
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
API_VERSION = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?v[0-9]+((alpha|beta)[0-9]+)?$")
NAME = re.compile(r"^[\x21-\x7e]{1,253}$")


class ArgumentError(ValueError):
    """A tool argument that names nothing the API server would route to (one line, shown to the agent)."""


@dataclass(frozen=True)
class Target:
    api_version: str
    resource: str
    namespaced: bool
    kind: str = ""

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str = "") -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespaced:
            if not namespace:
                raise ArgumentError(f"{self.resource} are namespaced: give a namespace")
            parts.append(f"namespaces/{check_namespace(namespace)}")
        elif namespace:
            raise ArgumentError(f"{self.resource} are not namespaced: leave namespace out")
        parts.append(self.resource)
        if name is not None:
            parts.append(quote(check_name(name), safe=""))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)

    def collection_path(self, namespace: str | None) -> str:
        """A list: in one namespace, or across all of them when `namespace` is empty."""
        if self.namespaced and not namespace:
            base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
            return f"{base}/{self.resource}"
        return self.path(namespace)


def check_namespace(namespace: str) -> str:
    if not NAMESPACE.match(namespace):
        raise ArgumentError(f"namespace {namespace[:80]!r} is not a valid namespace name")
    return namespace


def check_name(name: str) -> str:
    if name in (".", "..") or "/" in name or "%" in name or not NAME.match(name):
        raise ArgumentError(f"name {name[:80]!r} is not a valid object name")
    return name


def target(resource: str, api_version: str | None = None) -> Target:
    """The resource an agent names (`pods`, `deploy`, `deployments.apps`, or any plural with `api_version`)."""
    resource = resource.strip().lower()
    plural, _, group = resource.partition(".")
    plural = SHORT_NAMES.get(plural, plural)
    if not RESOURCE.match(plural):
        raise ArgumentError(f"resource {resource[:80]!r} is not a resource name (e.g. pods, deployments)")
    if api_version:
        if not API_VERSION.match(api_version):
            raise ArgumentError(f"api_version {api_version[:80]!r} is not `version` or `group/version`")
        known = KNOWN.get(plural)
        namespaced = known[2] if known and known[0] == api_version else True
        return Target(api_version, plural, namespaced, known[1] if known and known[0] == api_version else "")
    known = KNOWN.get(plural)
    if known is None or (group and not known[0].startswith(f"{group}/")):
        raise ArgumentError(f"unknown resource {resource[:80]!r}: give api_version (e.g. apps/v1) as well")
    return Target(known[0], plural, known[2], known[1])


def target_of_manifest(api_version: str, kind: str, resource: str | None) -> Target:
    """The resource of a manifest to apply: from its apiVersion and kind, or `resource` for other kinds."""
    if not API_VERSION.match(api_version or ""):
        raise ArgumentError("the manifest's apiVersion is missing or invalid")
    if resource:
        return target(resource, api_version)
    plural = BY_KIND.get((api_version, kind))
    if plural is None:
        raise ArgumentError(
            f"unknown kind {kind[:80]!r} in {api_version}: give resource (its plural) as well"
        )
    return target(plural)
