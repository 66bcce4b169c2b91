"""The masking of HTTP responses: what the API server is asked for, how each response is masked (by its
status and content type), and the body transformers — a whole JSON document, a watch's events, text — that
mask it as it streams, or withhold it when it cannot be masked."""

from __future__ import annotations

import json
import logging
import re
import zlib
from typing import Any
from urllib.parse import quote

import orjson

from kubegate.core.errors import StatusError
from kubegate.core.flow import BodyTransformer, Flow

from .masker import Masking, masking_of
from .media import JSON_FORM, YAML_FORM, Negotiated, NotAcceptable, content_type_for, negotiate, to_yaml
from .objects import KIND_OF_RESOURCE
from .settings import PLUGIN_NAME
from .stream import StreamMasker

log = logging.getLogger("kubegate.masking")
DROP_MEDIA = ("application/vnd.kubernetes.protobuf", "application/cbor")


def json_only(accept: str) -> str:
    """Accept without protobuf/CBOR ranges (the API's and OpenAPI's `...+protobuf`); JSON ranges keep their
    parameters (as=Table, discovery)."""
    kept = []
    for media_range in accept.split(","):
        media = media_range.strip().split(";", 1)[0].strip().lower()
        if media and not media.startswith(DROP_MEDIA) and "protobuf" not in media and "cbor" not in media:
            kept.append(media_range.strip())
    return ", ".join(kept) or "application/json"


# The API server's own documents (discovery, OpenAPI, version, health) hold no object data.
PASS_PATHS = ("/openapi/", "/version", "/livez", "/readyz", "/healthz", "/api/", "/apis/")


def holds_no_object_data(flow: Flow) -> bool:
    """Whether the request is for one of the API server's own documents (PASS_PATHS), passed unmasked."""
    path = flow.request.path
    return not flow.attributes.is_resource_request and (
        path in ("/api", "/apis") or path.startswith(PASS_PATHS)
    )


class Decoder:
    def __init__(self, encoding: str):
        self.z = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)

    def feed(self, chunk: bytes, limit: int = 0) -> bytes:
        """`chunk` decompressed; with `limit`, at most `limit` + 1 bytes of it (a few bytes of gzip expand a
        thousandfold: the caller sees it went over and stops reading). zlib.error: a corrupt stream."""
        return self.z.decompress(chunk, limit + 1) if limit else self.z.decompress(chunk)


def parse_json(data: bytes) -> Any:
    """One JSON document as the masker reads it, or ValueError for anything a client's parser might read
    differently from it: invalid UTF-8 (and lone surrogate escapes), a BOM, NaN/Infinity, numbers beyond a
    double, trailing data after the document, nesting deeper than 1024. Duplicate keys parse (last wins)
    and are harmless only because the re-serialization of this parse is what goes out."""
    return orjson.loads(data)


class JsonBody:
    """A whole JSON response: buffered, masked, sent as the re-serialization of the masked document (or
    that document rendered as YAML, `render="yaml"`). Unparsable → withheld."""

    def __init__(self, masking: Masking, flow: Flow, decoder: Decoder | None, render: str = JSON_FORM):
        self.masking, self.flow, self.decoder, self.render = masking, flow, decoder, render
        self.parts: list[bytes] = []
        self.size = 0
        self.broken = ""

    def feed(self, chunk: bytes) -> bytes:
        limit = self.masking.settings.max_body_bytes
        if self.size > limit or self.broken:
            return b""  # withheld at the end anyway: nothing more is decompressed or kept
        if self.decoder is not None:
            try:
                chunk = self.decoder.feed(chunk, limit - self.size)
            except zlib.error:
                self.broken = "its compressed body is corrupt"
                return b""
        self.size += len(chunk)
        if self.size <= limit:
            self.parts.append(chunk)
        return b""

    def end(self) -> bytes:
        body = b"".join(self.parts)
        if self.broken:
            return withheld(self.masking, self.flow, self.broken)
        if self.size > self.masking.settings.max_body_bytes:
            return withheld(
                self.masking, self.flow, f"larger than {self.masking.settings.max_body_bytes} bytes"
            )
        if not body.strip(b" \t\r\n"):
            return body
        try:
            doc = parse_json(body)
        except ValueError:
            return withheld(self.masking, self.flow, "not valid JSON")
        resource_kind = KIND_OF_RESOURCE.get(self.flow.attributes.resource, "")
        # Never upstream's bytes, even when nothing changed: a client parser reading duplicate keys
        # first-wins, or escapes differently, would see something other than what was checked.
        try:
            if self.render == YAML_FORM:
                return to_yaml(self.masking.mask_doc(doc, resource_kind))
            # The newline is the one the API server's encoder writes.
            return self.masking.mask_json(doc, resource_kind) + b"\n"
        except Exception as exc:  # whatever the cause, what was not masked does not go out
            return withheld(self.masking, self.flow, unreadable(exc))


class WatchLines:
    """A watch: newline-delimited JSON events, each masked as it completes (chunk boundaries anywhere)."""

    def __init__(self, masking: Masking, flow: Flow, decoder: Decoder | None):
        self.masking, self.flow, self.decoder = masking, flow, decoder
        self.pending = b""
        self.kind = KIND_OF_RESOURCE.get(flow.attributes.resource, "")
        self.broken = False

    def _line(self, line: bytes) -> bytes:
        if not line.strip(b" \t\r\n"):
            return line
        try:
            event = parse_json(line)
        except ValueError:
            # Also an event split over lines or two events on one (client-go's decoder reads both): each
            # line is one event here, and what is not one is withheld.
            return withheld(self.masking, self.flow, "a watch event is not valid JSON") + b"\n"
        try:
            return self.masking.mask_json(event, self.kind) + b"\n"  # re-serialized even when unchanged
        except Exception as exc:  # whatever the cause, what was not masked does not go out
            return withheld(self.masking, self.flow, unreadable(exc)) + b"\n"

    def feed(self, chunk: bytes) -> bytes:
        if self.broken:
            return b""
        if self.decoder is not None:
            limit = self.masking.settings.max_body_bytes
            try:
                chunk = self.decoder.feed(chunk, limit)
            except zlib.error:
                chunk = b""
                self.broken = True
            if self.broken or len(chunk) > limit:
                # The rest of the stream cannot be read (or was cut at the limit): none of it goes out.
                self.broken, self.pending = True, b""
                why = "the compressed watch stream cannot be read"
                return withheld(self.masking, self.flow, why) + b"\n"
        data = self.pending + chunk
        lines = data.split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > self.masking.settings.max_body_bytes:
            self.pending = b""
            return withheld(self.masking, self.flow, "a watch event is too large") + b"\n"
        return b"".join(self._line(line + b"\n") for line in lines)

    def end(self) -> bytes:
        out, self.pending = self.pending, b""
        if self.broken:
            return b""
        return self._line(out) if out.strip() else out


class Text:
    """`pods/log` (and `-f`): one streaming masker (stream.py) whatever the chunks; complete lines without a
    secret in progress go out at once."""

    def __init__(self, masking: Masking, decoder: Decoder | None):
        self.masking = masking
        self.stream = StreamMasker(masking.text, masking.settings.max_secret_bytes)
        self.decoder = decoder

    def feed(self, chunk: bytes) -> bytes:
        self.stream.use(self.masking.text)  # the known values may have changed since the last chunk
        return self.stream.feed(self.decoder.feed(chunk) if self.decoder is not None else chunk)

    def end(self) -> bytes:
        return self.stream.end()


class Withhold:
    """A response that cannot be masked: its body is dropped and a `Status` saying why goes instead."""

    def __init__(self, body: bytes):
        self.body = body

    def feed(self, chunk: bytes) -> bytes:
        return b""

    def end(self) -> bytes:
        return self.body


def unreadable(exc: Exception) -> str:
    """Why a document that parsed could not be masked: a shape the masker does not expect (no API server
    sends one), or a fault of the masker's own. Either way the response is withheld, and the reason logged
    in one line."""
    return f"the masker could not read it ({exc.__class__.__name__}: {str(exc)[:200]})"


def withheld(masking: Masking, flow: Flow, why: str) -> bytes:
    """The `Status` body sent instead of a response that could not be masked (recorded for the audit)."""
    flow.state.setdefault(PLUGIN_NAME, {})["withheld"] = why
    log.warning("masking on %s: withheld a response to %s: %s", flow.connection.name, flow.request.path, why)
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": f"kubegate withheld this response: it could not be masked ({why})",
                       "reason": "InternalError", "code": 502}).encode()  # fmt: skip


# -- hooks ------------------------------------------------------------------------------------------------


# -- the hooks' work ---------------------------------------------------------------------------------------


def prepare_upstream_request(flow: Flow) -> None:
    """Ask the API server for JSON only, uncompressed (a negotiation of its own for API objects: 406 for a
    client that accepts neither JSON nor YAML); mark an exempt caller, whose responses pass in clear."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    if masking is None:
        return
    if masking.exempt(flow.identity):
        flow.state[PLUGIN_NAME] = {"exempt": True}  # audited: this caller saw responses in clear
        return
    flow.output_masked = True  # a recording stores this session's output as the client got it
    # The API server reads the first Accept header only: so does the negotiation, and exactly one goes up.
    accept = next((value for name, value in flow.upstream_headers if name.lower() == "accept"), "")
    if _serves_objects(flow):
        try:
            negotiated = negotiate(accept, watch=flow.attributes.verb == "watch")
        except NotAcceptable as refusal:
            raise StatusError(406, str(refusal), "NotAcceptable") from None
        flow.state[NEGOTIATED] = negotiated
        upstream_accept = negotiated.upstream_accept
    else:
        upstream_accept = json_only(accept) if accept else "application/json"
    headers = [(name, value) for name, value in flow.upstream_headers
               if name.lower() not in ("accept", "accept-encoding")]  # fmt: skip
    headers += [("Accept", upstream_accept), ("Accept-Encoding", "identity")]
    flow.upstream_headers[:] = headers


# Where the negotiation is kept for the response (not in the audited `masking` entry: it is no JSON).
NEGOTIATED = f"{PLUGIN_NAME}.negotiated"


def _serves_objects(flow: Flow) -> bool:
    """Whether the response is an API object (negotiated like the API server's), not a pod's or a service's
    own content (`log`, `proxy`), a stream's upgrade, or a non-resource path (`/metrics`, discovery)."""
    attributes = flow.attributes
    return (
        attributes.is_resource_request
        and not flow.request.websocket
        and not attributes.is_streaming_subresource
        and attributes.subresource not in ("log", "proxy")
    )


# The API server's own Content-Type is one of its serializers' media types: only its parameters are text to
# mask (a known value equal to `application/json` must not make every answer undecodable). A pod's or a
# service's own (`…/proxy/…`) is masked whole like any other header.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+/[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def mask_response_headers(flow: Flow) -> None:
    """Every response header value from upstream masked by the text rules (known values, detectors,
    assignments), before the mode is chosen from them: a pod's or service's own server behind `…/proxy/`
    sends any header it likes (`Location: …?token=…`), admission webhooks and `messageExpression`s reach
    clients as `Warning`. A `Set-Cookie` keeps its name and attributes, never its value (the API server sets
    no cookie; a proxied one is the pod's). Names, order and framing are kept: the marker holds no CR or LF.

    Cheap when nothing matches (the common case): the values are masked joined, one pass; one by one only
    when that pass changed something, or when custom patterns (which may anchor at a value's start) are set."""
    masking = masking_of(flow)
    if masking is None:
        return
    headers = flow.response.headers
    if not headers:
        return
    mask = masking.text.mask
    if not masking.settings.patterns and not any(k.lower() == "set-cookie" for k, _ in headers):
        joined = "\n".join(_as_text(v) for _, v in headers)
        if mask(joined) == joined:
            return
    proxied = flow.attributes.subresource == "proxy"
    for index, (name, value) in enumerate(headers):
        lname = name.lower()
        text = _as_text(value)
        if lname == "set-cookie":
            cookie, semicolon, attributes = text.partition(";")
            cookie_name, equals, _ = cookie.partition("=")
            masked = (mask(cookie_name) + equals + quote(masking.settings.marker, safe="") if equals
                      else mask(cookie)) + semicolon + mask(attributes)  # fmt: skip
        elif lname == "content-type" and not proxied and (media := _MEDIA_TYPE.match(text)):
            masked = text[: media.end()] + mask(text[media.end() :])
        else:
            masked = mask(text)
        if masked != text:
            headers[index] = (name, masked.encode("utf-8", "surrogateescape").decode("latin-1"))


def _as_text(value: str) -> str:
    """A header value as text: its bytes (the host reads them as latin-1) as UTF-8, as a known value is."""
    return value if value.isascii() else value.encode("latin-1").decode("utf-8", "surrogateescape")


def choose_response_mode(flow: Flow) -> None:
    """How the response is masked (`flow.state[\"masking\"][\"mode\"]`: pass, json, watch, text or refuse),
    from its status and headers; the headers are adjusted for the body that will go out."""
    masking = masking_of(flow)
    if masking is None:
        return
    negotiated: Negotiated | None = flow.state.get(NEGOTIATED)
    headers = flow.response.headers
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "").lower()
    encoding = next((v for k, v in headers if k.lower() == "content-encoding"), "").lower()
    mode = "pass"
    if flow.response.status in (101, 204, 304):
        mode = "pass"
    elif holds_no_object_data(flow):
        mode = "pass"
    elif encoding not in ("", "identity", "gzip", "deflate"):
        mode = "refuse"
    elif content_type.startswith("application/json") or content_type.endswith("+json"):
        mode = "watch" if flow.attributes.verb == "watch" else "json"
    elif content_type.startswith("text/"):
        mode = "text"
    elif negotiated is not None:
        # An API object: JSON was asked for, and only JSON is read by structure. No Content-Type: the body
        # must parse as JSON; YAML (or anything else) is not masked as text, it is refused.
        mode = ("watch" if flow.attributes.verb == "watch" else "json") if not content_type else "refuse"
    elif content_type.startswith("application/yaml") or not content_type:
        mode = "text"  # a pod's or service's own content (log, proxy)
    else:
        mode = "refuse"
    render = JSON_FORM
    if mode == "json" and negotiated is not None:
        render = negotiated.form_for(content_type)
        if render != JSON_FORM:
            headers[:] = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", content_type_for(render, content_type or "application/json")))
    if mode == "refuse":
        if masking.settings.on_unparsable == "refuse":
            flow.response.status = 502
        headers[:] = [("Content-Type", "application/json")]  # the body becomes a Status
    elif mode != "pass":
        headers[:] = [(k, v) for k, v in headers if k.lower() not in ("content-encoding", "content-length")]
    flow.state.setdefault(PLUGIN_NAME, {})["mode"] = mode
    flow.state[PLUGIN_NAME]["render"] = render
    flow.state[PLUGIN_NAME]["encoding"] = encoding if encoding not in ("", "identity") else ""
    flow.state[PLUGIN_NAME]["content_type"] = content_type


def response_transformer(flow: Flow) -> BodyTransformer | None:
    """The transformer of the response body for the mode `choose_response_mode` chose; None to pass it."""
    masking = masking_of(flow)
    state = flow.state.get(PLUGIN_NAME) or {}
    if masking is None or state.get("mode", "pass") == "pass":
        return None
    decoder = Decoder(state["encoding"]) if state.get("encoding") else None
    mode = state["mode"]
    if mode == "json":
        return JsonBody(masking, flow, decoder, state.get("render", JSON_FORM))
    if mode == "watch":
        return WatchLines(masking, flow, decoder)
    if mode == "text":
        return Text(masking, decoder)
    return Withhold(withheld(masking, flow, f"content type {state.get('content_type') or 'unknown'}"))
