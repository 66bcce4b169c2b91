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
"""

from __future__ import annotations

from typing import Any

from kubegate.core.bodies import BodyError, decode_write_body, patch_media_type
from kubegate.core.flow import Decision, Flow, Verdict

# JSON pointers that reach a Secret's values: the values, their maps, or the whole object.
VALUE_POINTERS = ("/data", "/stringData")


def _reads_values(pointer: Any) -> bool:
    if not isinstance(pointer, str):
        return True  # not a pointer the patch library would accept either: do not guess
    return pointer == "" or any(pointer == root or pointer.startswith(root + "/") for root in VALUE_POINTERS)


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


async def decide(flow: Flow) -> Decision | None:
    """The masking plugin's decision on writes (see the module docstring); None for everything else."""
    attrs = flow.attributes
    if attrs.resource != "secrets" or attrs.subresource or flow.request.method != "PATCH":
        return None
    content_types = flow.request.header_values("content-type")
    try:
        if len(content_types) != 1 or patch_media_type(content_types[0]) != "application/json-patch+json":
            return None  # not a JSON patch (a Content-Type the API server refuses is refused there)
    except BodyError:
        return None
    body = await flow.request.read_body()
    try:
        why = reading_op(decode_write_body("PATCH", content_types[0], body).doc)
    except BodyError as exc:
        why = f"the JSON patch cannot be read ({exc}), so it could reveal a masked value"
    if why is None:
        return None
    return Decision(Verdict.DENY, f"masking: {why}", plugin="masking")
