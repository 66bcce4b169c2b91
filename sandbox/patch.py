"""The patch formats the apiserver accepts: JSON merge patch, JSON patch and strategic merge patch.

Strategic merge patch is implemented from the built-in types' patch metadata (the `patchMergeKey` /
`patchStrategy` struct tags) for the fields kubectl actually touches; lists without a known merge key are
replaced, as with JSON merge patch. kubectl's three-way patches also carry directives
(`$setElementOrder/<field>`, `$deleteFromPrimitiveList/<field>`, `$patch`, `$retainKeys`) which are honoured
or, where only ordering is affected, applied best-effort.
"""

from __future__ import annotations

import copy
from typing import Any

from .store import ApiError

# field name -> merge key for lists merged by key (from k8s.io/api struct tags). `ports` depends on the
# parent: containers merge ports by containerPort, services by port; decided from the elements.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "ownerReferences": "uid",
    "conditions": "type",
    "resourceClaims": "name",
    "secrets": "name",
}
# Primitive lists whose patch strategy is merge (set union).
MERGE_PRIMITIVES = {"finalizers"}


def _bad(message: str) -> ApiError:
    """A failed JSON patch operation. The apiserver wraps the patch library's error in
    NewGenericServerResponse(422): reason Invalid, a fixed message, empty details - the operation's own
    error text is not sent (kubectl then prints just "The request is invalid")."""
    del message  # kept at call sites for readability of the failure cause
    return ApiError(422, "Invalid", "the server rejected our request due to an error in our request", {})


# --- RFC 7386 -------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- RFC 6902 -------------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _bad(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            try:
                doc = doc[int(part)]
            except (ValueError, IndexError) as exc:
                raise _bad(f"unable to find index {part!r}") from exc
        elif isinstance(doc, dict):
            if part not in doc:
                raise _bad(f"doc is missing path: /{'/'.join(parts)}")
            doc = doc[part]
        else:
            raise _bad(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _add(doc: Any, parts: list[str], value: Any, replace: bool = False) -> Any:
    if not parts:
        return copy.deepcopy(value)
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(copy.deepcopy(value))
        else:
            try:
                idx = int(last)
            except ValueError as exc:
                raise _bad(f"invalid array index {last!r}") from exc
            if idx < 0 or idx > len(parent) or (replace and idx == len(parent)):
                raise _bad(f"array index {idx} out of bounds")
            if replace:
                parent[idx] = copy.deepcopy(value)
            else:
                parent.insert(idx, copy.deepcopy(value))
    elif isinstance(parent, dict):
        if replace and last not in parent:
            raise _bad(f"replace operation does not apply: doc is missing key: /{'/'.join(parts)}")
        parent[last] = copy.deepcopy(value)
    else:
        raise _bad(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise _bad("cannot remove the whole document")
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    try:
        if isinstance(parent, list):
            return parent.pop(int(last))
        return parent.pop(last)
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise _bad(f"remove operation does not apply: doc is missing path: /{'/'.join(parts)}") from exc


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise _bad("json patch operation is missing 'op'")
        kind = op["op"]
        parts = _pointer(op.get("path", ""))
        if kind == "add":
            doc = _add(doc, parts, op.get("value"))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            doc = _add(doc, parts, op.get("value"), replace=True)
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, src))
            if kind == "move":
                _remove(doc, src)
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise _bad(f"testing value /{'/'.join(parts)} failed: test failed")
        else:
            raise _bad(f"unexpected json patch operation {kind!r}")
    return doc


# --- strategic merge patch ------------------------------------------------------------------------------


def _merge_key(field_name: str, items: list[Any]) -> str | None:
    if field_name == "ports":
        for item in items:
            if isinstance(item, dict):
                if "containerPort" in item:
                    return "containerPort"
                if "port" in item:
                    return "port"
        return None
    return MERGE_KEYS.get(field_name)


def strategic_merge_patch(original: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        raise ApiError(400, "BadRequest", "strategic merge patch must be a JSON object")
    return _smp_map(copy.deepcopy(original) if isinstance(original, dict) else {}, patch)


def _smp_map(original: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    retain = patch.get("$retainKeys")
    order: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            order[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(original.get(name), list):
                original[name] = [v for v in original[name] if v not in (value or [])]
            continue
        if value is None:
            original.pop(key, None)
            continue
        current = original.get(key)
        if isinstance(value, dict):
            if value.get("$patch") == "delete":
                original.pop(key, None)
            else:
                original[key] = _smp_map(current if isinstance(current, dict) else {}, value)
        elif isinstance(value, list):
            original[key] = _smp_list(key, current if isinstance(current, list) else [], value)
        else:
            original[key] = value
    if isinstance(retain, list):
        for key in list(original):
            if key not in retain and key not in patch:
                original.pop(key)
    for name, wanted in order.items():
        if isinstance(original.get(name), list):
            original[name] = _reorder(name, original[name], wanted)
    return original


def _smp_list(field_name: str, current: list[Any], patch: list[Any]) -> list[Any]:
    if field_name in MERGE_PRIMITIVES:
        out = list(current)
        out += [v for v in patch if v not in out]
        return out
    key = _merge_key(field_name, current + patch)
    if key is None:
        if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
            return [p for p in patch if not (isinstance(p, dict) and "$patch" in p)]
        return copy.deepcopy(patch)
    out = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict):
            continue
        if item.get("$patch") == "replace":
            return [p for p in patch if not (isinstance(p, dict) and "$patch" in p)]
        idx = next(
            (i for i, o in enumerate(out) if isinstance(o, dict) and o.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_smp_map({}, item))
        else:
            out[idx] = _smp_map(out[idx], item)
    return out


def _reorder(field_name: str, items: list[Any], wanted: list[Any]) -> list[Any]:
    """Apply `$setElementOrder`: listed elements first in the given order, the rest after."""
    key = _merge_key(field_name, items)
    if key is None:
        return items
    order = [w.get(key) if isinstance(w, dict) else w for w in wanted]
    ranked = {k: i for i, k in enumerate(order)}
    return sorted(items, key=lambda o: ranked.get(o.get(key) if isinstance(o, dict) else o, len(ranked)))
