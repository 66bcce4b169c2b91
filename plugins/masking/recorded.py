"""What records keep of a request (approvals, audit, session recordings): its body, command line, query,
stated text and a session's streams, masked by the connection's rules, or the default rules where the
connection does not mask (`records.py` masks each shape)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from kubegate.core import bodies
from kubegate.core.flow import Flow

from . import records
from .masker import record_masking
from .objects import KIND_OF_RESOURCE
from .stream import StreamMasker

log = logging.getLogger("kubegate.masking")


def mask_body_for_record(flow: Flow, body: bytes) -> str:
    """A request body as it may be shown or stored (approvals, audit): masked JSON whatever its shape (an
    object, a List, a JSON/merge/strategic-merge/apply patch; JSON, YAML, or protobuf of a kind the decoder
    knows), else only its size and hash. See `records.py` for what each shape gets."""
    decoded = _decode_for_record(flow, body)
    if decoded is None:
        digest = hashlib.sha256(body).hexdigest()[:16]
        return f"<{len(body)} bytes, not decoded, sha256 {digest}…>" if body else ""
    shape, doc = decoded
    # Shown to people and stored: masked even where the connection does not mask its responses.
    attrs = flow.attributes
    rules = record_masking(flow).rules
    # A write's body is an object of the resource's kind; a DELETE's is DeleteOptions.
    write = flow.request.method.upper() in bodies.WRITE_METHODS
    kind = KIND_OF_RESOURCE.get(attrs.resource, "") if write else ""
    try:
        masked = records.mask_record_document(doc, shape, rules, kind, attrs.namespace, attrs.name)
    except Exception as exc:  # a body that was not masked is not shown: its size and hash are
        log.warning("masking: a request body to %s could not be masked for records: %s: %s",
                    flow.request.path, exc.__class__.__name__, str(exc)[:200])  # fmt: skip
        digest = hashlib.sha256(body).hexdigest()[:16]
        return f"<{len(body)} bytes, not masked, sha256 {digest}…>"
    return json.dumps(masked, separators=(",", ":"))


def _decode_for_record(flow: Flow, body: bytes) -> tuple[records.Shape, Any] | None:
    """The body's shape and document as the API server reads it (`core/bodies.py`), or None when it is
    empty or would be refused there. A DELETE's options (strict JSON) are shown too, read as a partial
    object (which masks more than a whole one)."""
    if not body:
        return None
    method = flow.request.method.upper()
    try:
        if method not in bodies.WRITE_METHODS:
            return "merge-patch", bodies.decode_json(body)
        decoded = bodies.decode_write_body(method, flow.request.header("content-type"), body)
    except bodies.BodyError:
        return None
    return decoded.shape, decoded.doc


def mask_command_for_record(flow: Flow, argv: list[str]) -> list[str]:
    """An exec/attach command line as records keep it (approvals, session rows, recording titles): each
    argument masked by the connection's text rules, secret-named variables and flags, and clients' password
    options (see `records.mask_command`); the default rules where the connection does not mask."""
    masking = record_masking(flow)
    return records.mask_command(argv, masking.text.mask, masking.env_name, masking.settings.marker)


def mask_query_for_record(flow: Flow, query: str) -> str | None:
    """A query string with its `command` parameters masked as `mask_command_for_record` masks them and the
    other parameters by the text rules (a proxied `?token=…`); None when nothing in it needed masking."""
    text_mask = record_masking(flow).text.mask
    return records.mask_command_query(query, lambda argv: mask_command_for_record(flow, argv), text_mask)


def mask_text_for_record(flow: Flow, data: bytes) -> bytes:
    """Text as it may be stored whole (a stated reason): masked by known values and patterns with the
    connection's masking, or the default rules where it has none."""
    return record_masking(flow).text.mask_bytes(data)


class RecordedStream:
    """One stream of a session as its recording keeps it (typed input, a channel of output no plugin masked
    for the client): a `StreamMasker` of the record masking, so a secret is masked wherever the stream is
    cut — a keystroke, a frame, a flush of the recording. What could still become part of a secret is held
    (at most the stream masker's bound); at the end it is masked, a secret in progress hidden whole
    (`StreamMasker.close`). The known values in use are the connection's as they are at each feed."""

    def __init__(self, flow: Flow):
        self.flow = flow
        masking = record_masking(flow)
        self.stream = StreamMasker(masking.text, masking.settings.max_secret_bytes)

    def feed(self, chunk: bytes) -> bytes:
        self._current()
        return self.stream.feed(chunk)

    def end(self) -> bytes:
        self._current()
        return self.stream.close()

    def _current(self) -> None:
        text = record_masking(self.flow).text
        if text is not self.stream.masker:  # the known values changed
            self.stream.use(text)
