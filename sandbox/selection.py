"""Label and field selectors (labels.Parse / fields.ParseSelector, the parts clients use)."""

from __future__ import annotations

import re
from typing import Any

from . import goparse
from .resources import Resource
from .store import ApiError

_SET_TERM = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s+(in|notin)\s+\((.*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


def parse_label_selector(selector: str) -> list[tuple[str, str, list[str]]]:
    reqs: list[tuple[str, str, list[str]]] = []
    for term in _split_terms(selector):
        m = _SET_TERM.match(term)
        if m:
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            reqs.append((m.group(1), m.group(2), values))
        elif term.startswith("!"):
            reqs.append((term[1:].strip(), "!", []))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            reqs.append((k.strip(), "!=", [v.strip()]))
        elif "==" in term:
            k, v = term.split("==", 1)
            reqs.append((k.strip(), "=", [v.strip()]))
        elif "=" in term:
            k, v = term.split("=", 1)
            reqs.append((k.strip(), "=", [v.strip()]))
        elif re.fullmatch(r"[A-Za-z0-9._/-]+", term):
            reqs.append((term, "exists", []))
        else:
            raise ApiError(
                400, "BadRequest", f"unable to parse requirement: found '{term}', expected: identifier"
            )
    return reqs


def labels_match(reqs: list[tuple[str, str, list[str]]], labels: dict[str, str]) -> bool:
    for key, op, values in reqs:
        has = key in labels
        val = labels.get(key)
        if (
            (op == "=" and val != values[0])
            or (op == "!=" and has and val == values[0])
            or (op == "in" and val not in values)
            or (op == "notin" and has and val in values)
            or (op == "exists" and not has)
            or (op == "!" and has)
        ):
            return False
    return True


def parse_field_selector(resource: Resource, selector: str) -> list[tuple[str, str, str]]:
    """fields.ParseSelector (escapes, no trimming; see goparse), then the resource's field label check."""
    allowed_fields = {"metadata.name", "metadata.namespace", *resource.field_selectors}
    terms = goparse.selector_terms(selector)
    if terms is None:
        raise ApiError(400, "BadRequest", f"invalid selector: '{selector}'")
    out = []
    for field_name, op, value in terms:
        if field_name not in allowed_fields:
            raise ApiError(400, "BadRequest", f"field label not supported: {field_name}")
        out.append((field_name, "!=" if op == "!=" else "=", value))
    return out


def _field_value(obj: dict[str, Any], path: str) -> str:
    if path == "source":
        return ((obj.get("source") or {}).get("component")) or ""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(reqs: list[tuple[str, str, str]], obj: dict[str, Any]) -> bool:
    for k, op, v in reqs:
        actual = _field_value(obj, k)
        if (op == "=" and actual != v) or (op == "!=" and actual == v):
            return False
    return True
