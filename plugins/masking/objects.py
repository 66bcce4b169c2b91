"""Structured masking of Kubernetes objects (JSON): what is a secret is known from the object's kind and
fields, not guessed. Every function edits the object in place and returns whether it changed anything.

Masked output stays valid for clients: a Secret's `data` values stay base64 (of the marker), annotations
stay strings (the last-applied configuration stays JSON), and `metadata` other than that one annotation is
never touched (names, uids, resourceVersions).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# resource (plural, from the request path) → kind, for list items and Table rows, which carry no kind
KIND_OF_RESOURCE = {
    "secrets": "Secret", "configmaps": "ConfigMap", "pods": "Pod", "deployments": "Deployment",
    "statefulsets": "StatefulSet", "daemonsets": "DaemonSet", "replicasets": "ReplicaSet", "jobs": "Job",
    "cronjobs": "CronJob", "podtemplates": "PodTemplate", "replicationcontrollers": "ReplicationController",
}  # fmt: skip
NO_POD_SPEC = frozenset({"Secret", "ConfigMap", "TokenRequest"})
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


@dataclass
class ObjectRules:
    marker: str
    env_name: re.Pattern[str]
    configmap_keys: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, name, key) globs
    scrub_text: Callable[[str], str] | None = None  # known values and detectors, for any other string

    def __post_init__(self) -> None:
        self.marker_b64 = base64.b64encode(self.marker.encode()).decode()


def mask_document(doc: Any, rules: ObjectRules, resource_kind: str = "") -> bool:
    """A response body: an object, a list, a Table or a watch event."""
    if not isinstance(doc, dict):
        return False
    kind = doc.get("kind", "")
    if kind == "Table" and isinstance(doc.get("rows"), list):
        changed = False
        for row in doc["rows"]:
            if isinstance(row, dict) and isinstance(row.get("object"), dict):
                changed |= mask_object(row["object"], rules, resource_kind)
            if isinstance(row, dict) and rules.scrub_text is not None and isinstance(row.get("cells"), list):
                changed |= _scrub_list(row["cells"], rules.scrub_text)
        return changed
    if isinstance(doc.get("items"), list) and (kind.endswith("List") or not kind):
        item_kind = kind[: -len("List")] if kind.endswith("List") and kind != "List" else resource_kind
        changed = False
        for item in doc["items"]:
            changed |= mask_object(item, rules, item_kind)
        return changed
    if kind == "WatchEvent" or (set(doc) == {"type", "object"} and isinstance(doc.get("object"), dict)):
        return mask_document(doc["object"], rules, resource_kind)
    return mask_object(doc, rules, resource_kind)


def mask_object(obj: Any, rules: ObjectRules, default_kind: str = "") -> bool:
    if not isinstance(obj, dict):
        return False
    kind = obj.get("kind") or default_kind
    changed = _mask_last_applied(obj, rules)
    if kind == "Secret":
        changed |= _mask_values(obj.get("data"), rules.marker_b64)
        changed |= _mask_values(obj.get("stringData"), rules.marker)
    elif kind == "ConfigMap":
        changed |= _mask_configmap(obj, rules)
    elif kind == "TokenRequest":
        status = obj.get("status")
        if isinstance(status, dict) and status.get("token"):
            status["token"] = rules.marker
            changed = True
    if kind not in NO_POD_SPEC:
        for spec in pod_specs(obj, kind):
            changed |= _mask_pod_spec(spec, rules)
    if rules.scrub_text is not None:
        changed |= _scrub_strings(obj, rules.scrub_text)
    return changed


def pod_specs(obj: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else None
    found: Any = None
    if kind == "Pod":
        found = spec
    elif kind == "PodTemplate":
        found = _dig(obj, "template", "spec")
    elif kind == "CronJob":
        found = _dig(obj, "spec", "jobTemplate", "spec", "template", "spec")
    elif spec is not None:  # Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, ReplicationController, CRDs
        found = _dig(obj, "spec", "template", "spec")
    return [found] if isinstance(found, dict) else []


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _mask_values(values: Any, marker: str) -> bool:
    if not isinstance(values, dict) or not values:
        return False
    for key in values:
        values[key] = marker
    return True


def _mask_pod_spec(spec: dict[str, Any], rules: ObjectRules) -> bool:
    changed = False
    for list_name in CONTAINER_LISTS:
        for container in spec.get(list_name) or []:
            if not isinstance(container, dict):
                continue
            for var in container.get("env") or []:
                if isinstance(var, dict) and isinstance(var.get("value"), str) and var["value"]:
                    if rules.env_name.search(str(var.get("name", ""))):
                        var["value"] = rules.marker
                        changed = True
    return changed


def _mask_configmap(obj: dict[str, Any], rules: ObjectRules) -> bool:
    if not rules.configmap_keys:
        return False
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    changed = False
    for section, marker in (("data", rules.marker), ("binaryData", rules.marker_b64)):
        values = obj.get(section)
        if not isinstance(values, dict):
            continue
        for key in values:
            for ns_glob, name_glob, key_glob in rules.configmap_keys:
                if (fnmatch.fnmatchcase(namespace, ns_glob) and fnmatch.fnmatchcase(name, name_glob)
                        and fnmatch.fnmatchcase(key, key_glob)):  # fmt: skip
                    values[key] = marker
                    changed = True
                    break
    return changed


def _mask_last_applied(obj: dict[str, Any], rules: ObjectRules) -> bool:
    annotations = _dig(obj, "metadata", "annotations")
    if not isinstance(annotations, dict) or not isinstance(annotations.get(LAST_APPLIED), str):
        return False
    try:
        applied = json.loads(annotations[LAST_APPLIED])
    except ValueError:
        annotations[LAST_APPLIED] = rules.marker  # cannot see inside: nothing of it goes out
        return True
    if mask_object(applied, rules):
        annotations[LAST_APPLIED] = json.dumps(applied, separators=(",", ":")) + "\n"
        return True
    return False


# Identifying fields clients need: never rewritten by value scrubbing.
KEEP = frozenset(
    {"name", "namespace", "uid", "resourceVersion", "generateName", "apiVersion", "kind", "selfLink"}
)


def restore_identifiers(masked: Any, original: Any) -> bool:
    """Put back the identifying fields (`KEEP`) of `original` into `masked`, the same document after a text
    pass that only rewrote strings; whether any was put back."""
    restored = False
    if isinstance(masked, dict) and isinstance(original, dict):
        for key, value in masked.items():
            before = original.get(key)
            if key in KEEP and isinstance(value, str) and isinstance(before, str):
                if value != before:
                    masked[key] = before
                    restored = True
            elif isinstance(value, dict | list):
                restored |= restore_identifiers(value, before)
    elif isinstance(masked, list) and isinstance(original, list) and len(masked) == len(original):
        for value, before in zip(masked, original, strict=True):
            if isinstance(value, dict | list):
                restored |= restore_identifiers(value, before)
    return restored


def _scrub_strings(node: Any, scrub: Callable[[str], str]) -> bool:
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key in KEEP:
                continue
            if isinstance(value, str):
                new = scrub(value)
                if new is not value and new != value:
                    node[key] = new
                    changed = True
            elif isinstance(value, dict | list):
                changed |= _scrub_strings(value, scrub)
    elif isinstance(node, list):
        changed |= _scrub_list(node, scrub)
    return changed


def _scrub_list(items: list[Any], scrub: Callable[[str], str]) -> bool:
    changed = False
    for index, value in enumerate(items):
        if isinstance(value, str):
            new = scrub(value)
            if new != value:
                items[index] = new
                changed = True
        elif isinstance(value, dict | list):
            changed |= _scrub_strings(value, scrub)
    return changed
