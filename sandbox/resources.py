"""The sandbox's API surface: which groups, versions and resources exist, and how they are described.

Everything the discovery documents, OpenAPI, the RESTMapper-facing verbs and the request parser need comes
from the single `RESOURCES` table below, so adding a kind is one entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Verb sets as the apiserver advertises them in discovery.
CRUD = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
# The proxy subresources (Connecters) as discovery lists them: every proxied HTTP method's verb.
PROXY_VERBS = ("create", "delete", "get", "patch", "update")
CRUD_NO_COLLECTION = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Subresource:
    name: str
    kind: str  # response kind (group/version of the parent)
    verbs: tuple[str, ...]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    verbs: tuple[str, ...] = tuple(CRUD)
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[Subresource, ...] = ()
    # The apiserver answers DELETE with the deleted object for some registries (ReturnDeletedObject) and with
    # a Status for the others; kubectl copes with both, but a gateway that inspects responses must too.
    returns_deleted_object: bool = True
    # Whether the main resource ignores .status on create/update (status is a subresource).
    has_status: bool = False
    # Only these are stored objects; reviews are answered from the request alone.
    virtual: bool = False
    name_rule: str = "subdomain"
    field_selectors: tuple[str, ...] = field(default=())

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def key(self) -> str:
        """Store key: resources are identified by group + plural (a single version per group here)."""
        return f"{self.group}/{self.plural}"


def _status(kind: str) -> Subresource:
    return Subresource("status", kind, ("get", "patch", "update"))


POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)

RESOURCES: list[Resource] = [
    Resource(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        False,
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
        short_names=("ns",),
        subresources=(_status("Namespace"), Subresource("finalize", "Namespace", ("update",))),
        has_status=True,
        name_rule="label",
        field_selectors=("status.phase",),
    ),
    Resource(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        True,
        short_names=("po",),
        categories=("all",),
        subresources=(
            Subresource("attach", "PodAttachOptions", ("create", "get")),
            Subresource("ephemeralcontainers", "Pod", ("get", "patch", "update")),
            Subresource("eviction", "Eviction", ("create",)),
            Subresource("exec", "PodExecOptions", ("create", "get")),
            Subresource("log", "Pod", ("get",)),
            Subresource("portforward", "PodPortForwardOptions", ("create", "get")),
            Subresource("proxy", "PodProxyOptions", PROXY_VERBS),
            _status("Pod"),
        ),
        has_status=True,
        field_selectors=POD_FIELDS,
    ),
    Resource(
        "",
        "v1",
        "secrets",
        "secret",
        "Secret",
        True,
        returns_deleted_object=False,
        field_selectors=("type",),
    ),
    Resource(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        True,
        short_names=("cm",),
        returns_deleted_object=False,
    ),
    Resource(
        "",
        "v1",
        "services",
        "service",
        "Service",
        True,
        verbs=tuple(CRUD),
        short_names=("svc",),
        categories=("all",),
        subresources=(Subresource("proxy", "ServiceProxyOptions", PROXY_VERBS), _status("Service")),
        has_status=True,
        name_rule="dns1035",
    ),
    Resource(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        True,
        short_names=("sa",),
        subresources=(Subresource("token", "TokenRequest", ("create",)),),
        returns_deleted_object=False,
    ),
    Resource(
        "",
        "v1",
        "events",
        "event",
        "Event",
        True,
        short_names=("ev",),
        returns_deleted_object=False,
        field_selectors=EVENT_FIELDS,
    ),
    Resource(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        True,
        short_names=("deploy",),
        categories=("all",),
        subresources=(_status("Deployment"), Subresource("scale", "Scale", ("get", "patch", "update"))),
        has_status=True,
    ),
    Resource(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        True,
        short_names=("rs",),
        categories=("all",),
        subresources=(_status("ReplicaSet"), Subresource("scale", "Scale", ("get", "patch", "update"))),
        has_status=True,
    ),
    Resource(
        "apps",
        "v1",
        "statefulsets",
        "statefulset",
        "StatefulSet",
        True,
        short_names=("sts",),
        categories=("all",),
        subresources=(_status("StatefulSet"), Subresource("scale", "Scale", ("get", "patch", "update"))),
        has_status=True,
    ),
    Resource(
        "apps",
        "v1",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        True,
        short_names=("ds",),
        categories=("all",),
        subresources=(_status("DaemonSet"),),
        has_status=True,
    ),
    Resource(
        "batch",
        "v1",
        "jobs",
        "job",
        "Job",
        True,
        categories=("all",),
        subresources=(_status("Job"),),
        has_status=True,
    ),
    Resource(
        "batch",
        "v1",
        "cronjobs",
        "cronjob",
        "CronJob",
        True,
        short_names=("cj",),
        categories=("all",),
        subresources=(_status("CronJob"),),
        has_status=True,
    ),
    Resource(
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "selfsubjectreview",
        "SelfSubjectReview",
        False,
        verbs=("create",),
        virtual=True,
    ),
    Resource(
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        "SelfSubjectAccessReview",
        False,
        verbs=("create",),
        virtual=True,
    ),
    Resource(
        "authorization.k8s.io",
        "v1",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        "SelfSubjectRulesReview",
        False,
        verbs=("create",),
        virtual=True,
    ),
]

# Preferred order of groups in /apis, like the apiserver's (core first, then built-in groups).
GROUP_ORDER = ["apps", "authentication.k8s.io", "authorization.k8s.io", "batch"]


def groups() -> dict[str, list[str]]:
    """group name -> versions (preferred first); the core group is ""."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        out.setdefault(r.group, [])
        if r.version not in out[r.group]:
            out[r.group].append(r.version)
    return out


def by_group_version(group: str, version: str) -> list[Resource]:
    return [r for r in RESOURCES if r.group == group and r.version == version]


def lookup(group: str, version: str, plural: str) -> Resource | None:
    for r in RESOURCES:
        if r.group == group and r.version == version and r.plural == plural:
            return r
    return None


def by_kind(api_version: str, kind: str) -> Resource | None:
    for r in RESOURCES:
        if r.api_version == api_version and r.kind == kind:
            return r
    return None


# --- name validation (apimachinery/pkg/util/validation) -------------------------------------------------

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = DNS1123_LABEL + r"(\." + DNS1123_LABEL + r")*"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"

_NAME_RULES = {
    "subdomain": (
        DNS1123_SUBDOMAIN,
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
        "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
        "validation is '" + DNS1123_SUBDOMAIN + "')",
    ),
    "label": (
        DNS1123_LABEL,
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
        "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
        "validation is '" + DNS1123_LABEL + "')",
    ),
    "dns1035": (
        DNS1035_LABEL,
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
        "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
        "regex used for validation is '" + DNS1035_LABEL + "')",
    ),
}


def validate_name(resource: Resource, name: str) -> str | None:
    """The apiserver's message for an invalid metadata.name, or None when valid."""
    pattern, max_len, message = _NAME_RULES[resource.name_rule]
    if len(name) > max_len:
        return f"must be no more than {max_len} characters"
    if not re.fullmatch(pattern, name):
        return message
    return None
