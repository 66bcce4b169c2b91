"""Structured masking of Kubernetes objects (JSON): what is a secret is known from the object's kind and
fields, not guessed. Every function edits the object in place and returns whether it changed anything.

Masked output stays valid for clients: a Secret's `data` values stay base64 (of the marker), annotations
stay strings (the last-applied configuration stays JSON), and identifiers are never rewritten by value
scrubbing — but only where Kubernetes puts identifiers (`IDENTIFIER_POSITIONS`: object metadata, owner and
event references, container/port/env/volume names), never for the same key names in data (a ConfigMap's
`data.name`, an annotation keyed `uid`).
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
# A Go struct's `Value` field as the API server's refusals print it (in a Status `message`): cmp.Diff's
# `Value: "…"` (ValidatePodUpdate's "pod updates may not change fields other than …" diff; multi-line
# values as a `"""` block or `strings.Join({…}, "\n")`) and %#v's `Value:"…"` (field.Invalid of a whole
# template: ValidateImmutableField's "field is immutable"). Every one is masked, whatever the `Name` before
# it: cmp leaves out fields it elides ("... // 1 identical field"), and the structs that have a `Value`
# (EnvVar, HTTPHeader, Sysctl, Toleration) say nothing a refusal needs.
GO_VALUE_FIELD = re.compile(
    r'(\bValue:[ \t]*)(?:"""\n[\s\S]*?"""|strings\.Join\(\{[\s\S]*?\}, "(?:[^"\\\n]|\\.)*"\)'
    r'|"(?:[^"\\\n]|\\.)*")'
)
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


@dataclass
class ObjectRules:
    marker: str
    env_name: re.Pattern[str]
    configmap_keys: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, name, key) globs
    scrub_text: Callable[[str], str] | None = None  # known values and detectors, for any other string
    # Containers or env that are not lists go whole (a document); kept, and skipped, in a skeleton that
    # records build around a JSON patch's value (records.py `_placed`), where a map stands for a list.
    replace_unreadable: bool = True
    # While a response body is masked (`Masking._mask`): the ids of the env lists of the document's own pod
    # templates that were read, so that any other env list can be noticed cheaply (`mask_env_anywhere`).
    env_lists: set[int] | None = None

    def __post_init__(self) -> None:
        self.marker_b64 = base64.b64encode(self.marker.encode()).decode()


def mask_document(doc: Any, rules: ObjectRules, resource_kind: str = "") -> bool:
    """A response body: an object, a list, a Table or a watch event.

    Read the way its shape says, and — where that reading is not "one object of the path's kind" — also as
    one object of the path's kind: a client that knows what it asked for reads it so whatever its `kind`
    (the Python client's `read_namespaced_secret` takes `data` from `{"items": [], "data": {…}}`). A document
    any API server sends has nothing there to mask (a list's own fields are apiVersion, kind, metadata)."""
    if not isinstance(doc, dict):
        return False
    kind = _kind_of(doc, "")
    if kind == "Table" and isinstance(doc.get("rows"), list):
        changed = False
        for row in doc["rows"]:
            if isinstance(row, dict) and isinstance(row.get("object"), dict):
                changed |= mask_object(row["object"], rules, resource_kind)
            if isinstance(row, dict) and rules.scrub_text is not None and isinstance(row.get("cells"), list):
                changed |= _scrub_list(row["cells"], rules.scrub_text)
        return _mask_as_path_kind(doc, rules, resource_kind, "rows") | changed
    if isinstance(doc.get("items"), list) and (kind.endswith("List") or not kind):
        item_kind = kind[: -len("List")] if kind.endswith("List") and kind != "List" else resource_kind
        changed = False
        for item in doc["items"]:
            changed |= mask_object(item, rules, item_kind)
        return _mask_as_path_kind(doc, rules, resource_kind, "items") | changed
    if isinstance(doc.get("object"), dict) and (kind == "WatchEvent" or set(doc) == {"type", "object"}):
        changed = mask_document(doc["object"], rules, resource_kind)
        return _mask_as_path_kind(doc, rules, resource_kind, "object") | changed
    changed = mask_object(doc, rules, resource_kind)  # also a WatchEvent without an object: read as one
    if resource_kind and _kind_of(doc, resource_kind) != resource_kind:
        changed |= _mask_as_path_kind(doc, rules, resource_kind, "")
    return changed


def _mask_as_path_kind(doc: dict[str, Any], rules: ObjectRules, resource_kind: str, read: str) -> bool:
    """Mask `doc`'s own fields (without `read`, the part already masked as what it is) as an object of the
    path's kind."""
    if not resource_kind:
        return False
    rest = {key: value for key, value in doc.items() if key != read}
    rest["kind"] = resource_kind
    if not mask_object(rest, rules, resource_kind):
        return False
    for key, value in rest.items():  # nested values were edited in place; top-level ones are put back
        if key != "kind" and key != read:
            doc[key] = value
    return True


def _kind_of(obj: dict[str, Any], default: str) -> str:
    """An object's `kind`; one that is not a string (no API server sends one; clients cannot decode it)
    counts as missing, so the object is masked as the resource's kind rather than as none."""
    kind = obj.get("kind")
    return kind if isinstance(kind, str) and kind else default


def mask_object(obj: Any, rules: ObjectRules, default_kind: str = "") -> bool:
    if not isinstance(obj, dict):
        return False
    kind = _kind_of(obj, default_kind)
    changed = _mask_last_applied(obj, rules, kind)
    if kind == "Secret":
        # Every value whatever its size or bytes (short, binary, 1 MiB): this does not depend on the known
        # values. A `data` that is not a map (no API server sends one; a proxy or aggregated API might)
        # cannot be read value by value: all of it goes.
        for section, marker in (("data", rules.marker_b64), ("stringData", rules.marker)):
            if isinstance(obj.get(section), dict):
                changed |= _mask_values(obj[section], marker)
            elif obj.get(section) is not None:
                obj[section] = marker
                changed = True
    elif kind == "ConfigMap":
        changed |= _mask_configmap(obj, rules)
    elif kind == "Status":
        changed |= _mask_status_messages(obj, rules)
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


def _mask_status_messages(status: dict[str, Any], rules: ObjectRules) -> bool:
    """A Status's `message` and `details.causes[].message`: the Go `Value` fields they quote (GO_VALUE_FIELD)."""
    changed = False
    causes = _dig(status, "details", "causes")
    for holder in [status, *(causes if isinstance(causes, list) else [])]:
        if (
            isinstance(holder, dict)
            and isinstance(holder.get("message"), str)
            and "Value:" in holder["message"]
        ):
            masked = GO_VALUE_FIELD.sub(lambda m: f'{m.group(1)}"{rules.marker}"', holder["message"])
            if masked != holder["message"]:
                holder["message"] = masked
                changed = True
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
        if not _readable_list(spec, list_name, rules):
            changed |= rules.replace_unreadable
            continue
        for container in spec.get(list_name) or []:
            if not isinstance(container, dict):
                continue
            if not _readable_list(container, "env", rules):
                changed |= rules.replace_unreadable
                continue
            if rules.env_lists is not None and isinstance(container.get("env"), list):
                rules.env_lists.add(id(container["env"]))
            for var in container.get("env") or []:
                if isinstance(var, dict) and isinstance(var.get("value"), str) and var["value"]:
                    if rules.env_name.search(str(var.get("name", ""))):
                        var["value"] = rules.marker
                        changed = True
    return changed


def _readable_list(obj: dict[str, Any], key: str, rules: ObjectRules) -> bool:
    """Whether obj[key] is absent, null or a list. Anything else (no API server sends one) cannot be read
    item by item, so all of it goes, as a Secret's `data` that is not a map does; False then (also where
    `rules` keep it: then it is only skipped)."""
    if isinstance(obj.get(key), list) or obj.get(key) is None:
        return True
    if rules.replace_unreadable:
        obj[key] = rules.marker
    return False


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


def _mask_last_applied(obj: dict[str, Any], rules: ObjectRules, kind: str) -> bool:
    """The last-applied annotation of `obj` (of `kind`), masked as the object it says it is *and* as an
    object of `obj`'s kind, namespace and name: kubectl writes it without the namespace when that came from
    the kubeconfig's context (`create configmap --save-config` sets it only with `-n`), so a
    `configmap_keys` rule for the object's namespace must match the annotation too."""
    annotations = _dig(obj, "metadata", "annotations")
    if not isinstance(annotations, dict) or not isinstance(annotations.get(LAST_APPLIED), str):
        return False
    original = annotations[LAST_APPLIED]
    try:
        applied = json.loads(original, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        applied = None
    if not isinstance(applied, dict):
        annotations[LAST_APPLIED] = rules.marker  # cannot see inside (kubectl writes an object): nothing goes
        return True
    meta = obj["metadata"]  # a map: the annotations are in it
    namespace, name = meta.get("namespace"), meta.get("name")
    env_lists, rules.env_lists = rules.env_lists, None  # not the document's own: they are in a string
    try:
        mask_object(applied, rules)
        for reading in {_kind_of(applied, kind), kind} - {""}:
            mask_object_as(applied, rules, reading, namespace, name)
        if '"env"' in original:
            mask_env_anywhere(applied, rules)
    finally:
        rules.env_lists = env_lists
    # Always the re-serialization of what was inspected: with duplicate keys in the annotation a client's
    # parser could otherwise read another value than the one checked here (kubectl writes it this way too).
    rewritten = json.dumps(applied, separators=(",", ":")) + "\n"
    if rewritten != original:
        annotations[LAST_APPLIED] = rewritten
        return True
    return False


_ABSENT = object()


def mask_object_as(obj: dict[str, Any], rules: ObjectRules, kind: str, namespace: Any, name: Any) -> bool:
    """`mask_object` of `obj` read as an object of `kind` in `namespace` named `name` (each where it is a
    non-empty string; else `obj`'s own), whatever `obj` says; what it says is put back afterwards."""
    meta = obj.get("metadata", _ABSENT)
    if meta is _ABSENT or meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return mask_object(obj, rules, kind)  # read as is (a metadata no API server sends)
    saved = [(obj, "kind", obj.get("kind", _ABSENT)), (obj, "metadata", obj.get("metadata", _ABSENT))]
    saved += [(meta, key, meta.get(key, _ABSENT)) for key in ("namespace", "name")]
    obj["kind"], obj["metadata"] = kind, meta
    for key, value in (("namespace", namespace), ("name", name)):
        if isinstance(value, str) and value:
            meta[key] = value
    try:
        return mask_object(obj, rules, kind)
    finally:
        for where, key, value in reversed(saved):
            if value is _ABSENT:
                where.pop(key, None)
            else:
                where[key] = value


def mask_env_anywhere(node: Any, rules: ObjectRules, partial: bool = False) -> bool:
    """Every `env` list, wherever it is (a custom resource's pod template, a ControllerRevision's `data`, a
    patch): values of secret-named variables, and with `partial` (a patch) values whose name is not there
    to judge. Whether it changed anything."""
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                for var in value:
                    if not isinstance(var, dict) or var.get("value") in (None, "", rules.marker):
                        continue  # nothing to hide
                    var_name = var.get("name")
                    secret_name = isinstance(var_name, str) and bool(rules.env_name.search(var_name))
                    if secret_name or (partial and not isinstance(var_name, str)):
                        var["value"] = rules.marker
                        changed = True
            if isinstance(value, dict | list):
                changed |= mask_env_anywhere(value, rules, partial)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                changed |= mask_env_anywhere(item, rules, partial)
    return changed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Where Kubernetes puts identifiers clients need (names, uids, kinds): a position → {key: what it is}.
# IDENT marks an identifier, kept as the API server sent it by value scrubbing; another position name means
# "walk into it" (`X[]`: a list of X). Every other key is data, scrubbed whatever its name: `name` in a
# ConfigMap's `data`, in labels or annotations, is data. "document" is resolved by the document's shape
# (`_resolve`). Schema identifiers in pod specs are kept because clients address by them (`kubectl logs
# -c NAME`, `exec -c`, ports by name) and they are chosen by whoever writes the spec, not secret values.
IDENT = "ident"
IDENTIFIER_POSITIONS: dict[str, dict[str, str]] = {
    "table": {"kind": IDENT, "apiVersion": IDENT, "metadata": "listmeta", "columnDefinitions": "column[]",
              "rows": "row[]"},
    "column": {"name": IDENT, "type": IDENT, "format": IDENT},
    "row": {"object": "object"},
    "list": {"kind": IDENT, "apiVersion": IDENT, "metadata": "listmeta", "items": "object[]"},
    "listmeta": {"resourceVersion": IDENT, "continue": IDENT, "selfLink": IDENT},
    "event": {"type": IDENT, "object": "document"},
    "object": {"kind": IDENT, "apiVersion": IDENT, "metadata": "metadata", "spec": "spec", "status": "status",
               "involvedObject": "reference", "regarding": "reference", "related": "reference"},
    "metadata": {"name": IDENT, "namespace": IDENT, "uid": IDENT, "resourceVersion": IDENT,
                 "generateName": IDENT, "selfLink": IDENT, "ownerReferences": "owner[]"},
    "owner": {"apiVersion": IDENT, "kind": IDENT, "name": IDENT, "uid": IDENT},
    "reference": {"apiVersion": IDENT, "kind": IDENT, "name": IDENT, "namespace": IDENT, "uid": IDENT,
                  "resourceVersion": IDENT, "fieldPath": IDENT},
    # object specs and pod templates (Deployment … CronJob's jobTemplate, StatefulSet's claim templates)
    "spec": {"template": "template", "jobTemplate": "template", "volumeClaimTemplates": "object[]",
             "containers": "container[]", "initContainers": "container[]",
             "ephemeralContainers": "container[]", "volumes": "named[]"},
    "template": {"metadata": "metadata", "spec": "spec"},
    "container": {"name": IDENT, "ports": "named[]", "env": "named[]", "volumeMounts": "named[]"},
    "named": {"name": IDENT},
    "status": {"containerStatuses": "named[]", "initContainerStatuses": "named[]",
               "ephemeralContainerStatuses": "named[]"},
}  # fmt: skip
NOTHING: dict[str, str] = {}


def _resolve(node: dict[str, Any], position: str) -> dict[str, str]:
    """The identifier table for a dict at `position` ("document": by shape, as `mask_document` reads it)."""
    if position == "document":
        kind = node.get("kind", "")
        if kind == "Table" and isinstance(node.get("rows"), list):
            position = "table"
        elif isinstance(node.get("items"), list) and (
            not kind or (isinstance(kind, str) and kind.endswith("List"))
        ):
            position = "list"
        elif kind == "WatchEvent" or (
            set(node) == {"type", "object"} and isinstance(node.get("object"), dict)
        ):
            position = "event"
        else:
            position = "object"
    return IDENTIFIER_POSITIONS.get(position, NOTHING)


def restore_identifiers(masked: Any, original: Any, position: str = "document") -> bool:
    """Put back the identifiers (`IDENTIFIER_POSITIONS`) of `original` into `masked`, the same document after
    a text pass that only rewrote strings; whether any was put back. Keys elsewhere stay as masked."""
    if position.endswith("[]"):
        if not (isinstance(masked, list) and isinstance(original, list) and len(masked) == len(original)):
            return False
        restored = False
        for value, before in zip(masked, original, strict=True):
            restored |= restore_identifiers(value, before, position[:-2])
        return restored
    if not (isinstance(masked, dict) and isinstance(original, dict)):
        return False
    restored = False
    for key, child in _resolve(original, position).items():
        value, before = masked.get(key), original.get(key)
        if child == IDENT:
            if isinstance(value, str) and isinstance(before, str) and value != before:
                masked[key] = before
                restored = True
        elif isinstance(value, dict | list):
            restored |= restore_identifiers(value, before, child)
    return restored


def scrub_document(doc: Any, scrub: Callable[[str], str]) -> bool:
    """Scrub every string of a response body (an object, list, Table, watch event, or any JSON value) but
    identifiers in identifier positions."""
    return _scrub_strings(doc, scrub, "document")


def _scrub_strings(node: Any, scrub: Callable[[str], str], position: str = "object") -> bool:
    """Scrub every string in `node` (a dict or list at `position`), keys too, but identifiers in identifier
    positions."""
    changed = False
    if isinstance(node, dict):
        table = _resolve(node, position)
        for key, value in node.items():
            child = table.get(key, "data")
            if isinstance(value, str):
                if child == IDENT:
                    continue
                new = scrub(value)
                if new is not value and new != value:
                    node[key] = new
                    changed = True
            elif isinstance(value, dict | list):
                changed |= _scrub_strings(value, scrub, child)
        # Keys are text as well (the value pass over the serialized document masks them): a ConfigMap keyed
        # by a known value, say. Renamed in place, in order; keys that become the same keep the last value,
        # as parsing the masked text would.
        keys = [(key, scrub(key)) for key in node]
        if any(new is not key and new != key for key, new in keys):
            items = [(new, node[key]) for key, new in keys]
            node.clear()
            for key, value in items:
                node[key] = value
            changed = True
    elif isinstance(node, list):
        changed |= _scrub_list(node, scrub, position[:-2] if position.endswith("[]") else "data")
    return changed


def _scrub_list(items: list[Any], scrub: Callable[[str], str], position: str = "data") -> bool:
    changed = False
    for index, value in enumerate(items):
        if isinstance(value, str):
            new = scrub(value)
            if new != value:
                items[index] = new
                changed = True
        elif isinstance(value, dict | list):
            changed |= _scrub_strings(value, scrub, position)
    return changed
