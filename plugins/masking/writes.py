"""Writes that would read a masked Secret value back out: refused on masked connections.

Masking hides a Secret's `data` in every response, but a JSON patch (RFC 6902) can do two things with a
value its sender cannot see:

- `copy` or `move` it to a field masking does not cover (`/metadata/annotations/x`, `/type`), where the
  next `get` shows it — base64 of the value, in clear for anything the value learner does not know;
- `test` it against a guess: the patch fails with 422 unless the guess is right, so repeated patches are an
  oracle that confirms a short password character run by character run.

Neither has a use that needs the value hidden from the caller (a caller who may see it is exempt from
masking). So on a masked connection, a JSON patch of a Secret whose `copy`/`move` reads from, or whose
`test` looks at, the Secret's values is denied with a reason kubectl prints. A JSON patch the gateway
cannot read is denied on Secrets too: it could be either. Merge and strategic-merge patches cannot read a
value, and a whole-object write (PUT) carries only what the caller already has.

The other way round: a write that puts the masking marker itself into a Secret's values (a `kubectl replace`
of what `kubectl get -o yaml` showed) would replace the real values with the marker — lost data. Such a
write is refused with a message that says so.
"""

from __future__ import annotations

from typing import Any

from kubegate.core.bodies import Body, BodyError, decode_write_body, patch_media_type
from kubegate.core.flow import Decision, Flow, Verdict

# JSON pointers that reach a Secret's values: the values, their maps, or the whole object.
VALUE_POINTERS = ("/data", "/stringData")


def _reads_values(pointer: Any) -> bool:
    if not isinstance(pointer, str) or not pointer.startswith("/"):
        # Not a pointer the patch library reads as RFC 6901 does (it drops the first segment of
        # `x/data/password`; the body reader refuses those): do not guess
        return True
    return any(pointer == root or pointer.startswith(root + "/") for root in VALUE_POINTERS)


def reading_op(ops: Any) -> str | None:
    """Why this JSON patch would reveal a Secret value (None when it would not)."""
    if not isinstance(ops, list):
        return "the JSON patch is not a list of operations"
    for op in ops:
        if not isinstance(op, dict):
            return "the JSON patch holds an operation that is not an object"
        kind = op.get("op")
        if kind in ("copy", "move") and _reads_values(op.get("from")):
            return f"a {kind} from {op.get('from')!r} would put a masked Secret value where it can be read"
        if kind == "test" and _reads_values(op.get("path")):
            return (
                f"a test of {op.get('path')!r} would tell whether a guess of a masked Secret value is right"
            )
    return None


def writes_marker(doc: Any, markers: tuple[str, ...]) -> bool:
    """Whether a Secret body (an object, a merge/apply patch, or a JSON patch's values) sets a value to the
    marker — a masked copy written back."""
    if isinstance(doc, list):  # JSON patch
        return any(
            isinstance(op, dict)
            and _reads_values(op.get("path"))
            and writes_marker_value(op.get("value"), markers)
            for op in doc
        )
    if not isinstance(doc, dict):
        return False
    return any(writes_marker_value(doc.get(field), markers) for field in ("data", "stringData"))


def writes_marker_value(value: Any, markers: tuple[str, ...]) -> bool:
    if isinstance(value, str):
        return value in markers
    if isinstance(value, dict):
        return any(writes_marker_value(item, markers) for item in value.values())
    return False


async def decide(flow: Flow, markers: tuple[str, ...]) -> Decision | None:
    """The masking plugin's decision on writes (see the module docstring); None for everything else.
    `markers`: the marker as masked responses carry it (plain, and base64 as in `data`)."""
    attrs = flow.attributes
    method = flow.request.method
    if attrs.resource != "secrets" or attrs.subresource or method not in ("POST", "PUT", "PATCH"):
        return None
    content_types = flow.request.header_values("content-type")
    if len(content_types) > 1:
        return None  # refused by the policy's body reading, or by the API server
    content_type = content_types[0] if content_types else ""
    raw = await flow.request.read_body()
    try:
        body: Body | None = decode_write_body(method, content_type, raw)
        unreadable = ""
    except BodyError as exc:
        body, unreadable = None, str(exc)
    if body is not None and writes_marker(body.doc, markers):
        return _deny(
            "this write sets a Secret value to the masking marker — it would replace the real value with the "
            "marker (a masked copy written back); write the values you mean"
        )
    if method != "PATCH" or not _is_json_patch(content_type):
        return None  # other unreadable bodies are the API server's to refuse: they cannot read a value
    if body is None:
        return _deny(f"the JSON patch cannot be read ({unreadable}), so it could reveal a masked value")
    why = reading_op(body.doc)
    return None if why is None else _deny(why)


def _is_json_patch(content_type: str) -> bool:
    try:
        return patch_media_type(content_type) == "application/json-patch+json"
    except BodyError:
        return False  # a Content-Type the API server refuses for PATCH: refused there


def _deny(why: str) -> Decision:
    return Decision(Verdict.DENY, f"masking: {why}", plugin="masking")
