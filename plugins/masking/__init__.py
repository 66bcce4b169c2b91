"""The `masking` plugin: secret values never reach the client in clear.

On a connection that enables it: JSON responses (objects, lists, Tables, watch streams) are masked by
structure (`objects.py`) and by value, and what goes out is always the re-serialization of the document
that was inspected (never upstream's bytes: no parser difference such as duplicate keys survives);
`pods/log` text and exec/attach output are masked by value and pattern (`text.py`); the gateway asks the
API server for JSON only, uncompressed, renders YAML itself after masking (`media.py`), answers 406 to a
client that accepts neither, and refuses (or redacts) a response it cannot parse rather than pass it. See
docs/masking.md for exactly what is masked and what is not.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import logging
import re
import zlib
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubegate.core import bodies
from kubegate.core.errors import StatusError
from kubegate.core.flow import Decision, Flow, Frame, FrameDirection, Identity, Session
from kubegate.core.plugins import hookimpl

from . import records, scanner, writes
from .forms import KnownForms
from .known import KnownIndex, KnownSecrets
from .media import JSON_FORM, YAML_FORM, Negotiated, NotAcceptable, content_type_for, negotiate, to_yaml
from .objects import KIND_OF_RESOURCE, ObjectRules, mask_document, restore_identifiers, scrub_document
from .stream import ChannelMaskers, StreamMasker
from .text import DEFAULT_NON_SECRET_NAMES, DETECTORS, TextMasker, custom_patterns, detector_patterns

if TYPE_CHECKING:
    from kubegate.core.gateway import Gateway

PLUGIN_NAME = "masking"
log = logging.getLogger("kubegate.masking")
NON_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_ENV_NAMES = ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "PRIVATE", "AUTH", "CERT"]
DROP_MEDIA = ("application/vnd.kubernetes.protobuf", "application/cbor")


class ConfigMapKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespaces: str = "*"
    names: str = "*"
    keys: list[str] = Field(min_length=1, description="Key globs whose values are masked.")


class KnownValues(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    namespaces: list[str] = Field(default_factory=list, description="Whose Secrets to learn; default all.")
    min_length: int = Field(6, ge=1, le=1024, description="Shorter values (in characters) are not learned.")
    max_values: int = Field(10_000, ge=1, le=1_000_000)
    max_value_bytes: int = Field(
        4096, ge=16, le=1 << 20, description="Longer values (in bytes) are not learned."
    )


class Exempt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class MaskingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    marker: str = Field(
        "<masked by kubegate>",
        min_length=1,
        description="What replaces a secret value (no quotes, backslashes or control characters: it is written "
        "into JSON text).",
    )
    env_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENV_NAMES),
        description="Regexes (case-insensitive, searched) for env var names whose `value` is masked.",
    )
    non_secret_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NON_SECRET_NAMES),
        description="Exact, case-sensitive variable names whose values the name rules (`env_names`, "
        "`assignments`) leave alone: well-known non-secrets such as PWD. Known values and detectors still "
        "apply to their values.",
    )
    configmap_keys: list[ConfigMapKeys] = Field(default_factory=list)
    detectors: list[str] = Field(default_factory=lambda: list(DETECTORS))
    assignments: bool = Field(True, description="Mask VALUE in `PASSWORD=VALUE`-style text.")
    patterns: list[str] = Field(default_factory=list, description="Extra regexes; each match is masked.")
    known_values: KnownValues = Field(default_factory=lambda: KnownValues())
    on_unparsable: Literal["refuse", "redact"] = Field(
        "refuse", description="A response that cannot be masked: 502 Status, or its body replaced."
    )
    exempt: Exempt = Field(default_factory=lambda: Exempt())
    max_body_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest JSON response masked.")
    engine: Literal["auto", "hyperscan", "python"] = Field(
        "auto",
        description="How patterns are found: one Hyperscan pass (`auto` when the package is installed), or "
        "Python regexes around hint words (slower; the only choice where Hyperscan has no wheel).",
    )
    exec_hold_ms: int = Field(
        30, ge=1, le=2000, description="Longest exec/attach output is held back to join a split secret."
    )
    exec_hold_from: int = Field(
        1,
        ge=1,
        le=16,
        description="exec/attach output holds a possible secret from this many characters on. 1 (default): "
        "from its first character, so no part of a secret split across frames goes out; the echo of a typed "
        "character that may begin a secret then waits up to exec_hold_ms. 4: keystroke echo is never held, "
        "and up to 3 first characters of a secret split right there may go out (the rest is masked).",
    )
    max_secret_bytes: int = Field(
        16 * 1024,
        ge=256,
        le=16 * 1024 * 1024,
        description="Longest text a stream (logs, exec/attach output) holds back while a secret may be in "
        "progress (at least the longest known value form); a match still open at this length is replaced by "
        "the marker and the rest of it, up to the next whitespace or quote, is not sent.",
    )

    @field_validator("marker")
    @classmethod
    def _marker(cls, marker: str) -> str:
        # The marker is written into JSON text by the value pass: a quote, backslash or control character
        # could end a string early and change the document's structure.
        if any(char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F for char in marker):
            raise ValueError("the marker may not contain quotes, backslashes or control characters")
        return marker

    @field_validator("detectors")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in DETECTORS:
                raise ValueError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
        return names

    @field_validator("engine")
    @classmethod
    def _engine(cls, engine: str) -> str:
        if engine == "hyperscan" and not scanner.available():
            raise ValueError("engine 'hyperscan' needs the hyperscan package, which is not installed")
        return engine

    @field_validator("non_secret_names")
    @classmethod
    def _plain_names(cls, names: list[str]) -> list[str]:
        # Whole names, not patterns: `.*` or `DB_*` here would switch the name rules off wholesale.
        for name in names:
            if not NON_SECRET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, '_'; no patterns)")
        return names

    @field_validator("patterns", "env_names")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns


def env_name_rule(env_names: list[str], non_secret_names: list[str]) -> re.Pattern[str]:
    """One regex for "this env var name holds a secret", searched in a whole name (objects, records, command
    lines): any of `env_names` (case-insensitive), unless the name is exactly one of `non_secret_names`
    (case-sensitive: `pwd` or `Pwd` are not the shell's PWD)."""
    secret = "|".join(f"(?:{p})" for p in env_names)
    if not secret:
        return re.compile("(?!)")
    if not non_secret_names:
        return re.compile(secret, re.I)
    allowed = "|".join(re.escape(name) for name in non_secret_names)
    # Anchored at the name's start, so `search` tries the exception once; then any position, as before.
    return re.compile(rf"\A(?!(?-i:{allowed})\Z)[\s\S]*?(?:{secret})", re.I)


class Masking:
    """One connection's masking: rules, the current text masker, the known-values follower."""

    def __init__(self, settings: MaskingSettings):
        self.settings = settings
        self.patterns = [*detector_patterns(settings.detectors), *custom_patterns(settings.patterns)]
        self.env_name = env_name_rule(settings.env_names, settings.non_secret_names)
        self.known: KnownSecrets | None = None
        self.known_index = KnownIndex(self._use_known)
        self.set_known(set())

    def set_known(self, values: set[str]) -> None:
        """Mask exactly these known values from now on (synchronously; the follower of the cluster's
        Secrets calls `known_changed` instead)."""
        self.known_index.set_now(values)

    def known_changed(self, values: set[str]) -> None:
        """The cluster's Secrets changed: new values are masked at once, the rest is reindexed off the
        event loop (see `KnownIndex`)."""
        self.known_index.update(values)

    def _use_known(self, forms: KnownForms) -> None:
        s = self.settings
        self.text = TextMasker(s.marker, (), self.patterns, s.assignments, s.engine, known_forms=forms,
                               non_secret_names=s.non_secret_names)  # fmt: skip
        configmap_keys = [(c.namespaces, c.names, k) for c in s.configmap_keys for k in c.keys]
        self.rules = ObjectRules(s.marker, self.env_name, configmap_keys, scrub_text=self.text.mask)
        self.structure_rules = ObjectRules(s.marker, self.env_name, configmap_keys)

    def mask_doc(self, doc: Any, resource_kind: str) -> Any:
        """Mask a parsed JSON document; the masked document (`doc` itself, edited, or a new one)."""
        return self._mask(doc, resource_kind)[0]

    def mask_json(self, doc: Any, resource_kind: str) -> bytes:
        """Mask a parsed JSON document; the masked document serialized (always: what goes out is exactly
        what was inspected, whatever the bytes it was parsed from)."""
        masked, serialized = self._mask(doc, resource_kind)
        return serialized if serialized is not None else orjson.dumps(masked)

    def _mask(self, doc: Any, resource_kind: str) -> tuple[Any, bytes | None]:
        """The masked document, and its serialization when nothing in it changed (None otherwise).

        Structure first (Secret data, env values… — a walk of the parsed document), then values and
        patterns over the serialized text in one pass (much faster than visiting every string). Markers
        contain no quote or backslash, so the text stays JSON; if a pattern ever broke it, the slow
        per-string scrub is used instead. When the text pass changes nothing, the text it read is the
        serialization of the masked document: returned so that it is not serialized a second time.
        """
        mask_document(doc, self.structure_rules, resource_kind)
        serialized = orjson.dumps(doc)
        text = serialized.decode()
        scrubbed = self.text.mask(text)
        if scrubbed is text or scrubbed == text:
            return doc, serialized
        try:
            masked = orjson.loads(scrubbed)
        except ValueError:
            # The slow way: string by string, everywhere (not only where `mask_document` looks: list items
            # that are not objects, a top-level array or string), identifiers in their positions kept.
            if isinstance(doc, str):
                return self.text.mask(doc), None
            mask_document(doc, self.rules, resource_kind)
            scrub_document(doc, self.text.mask)
            return doc, None
        # The text pass saw names and uids too: a known value that is also an object's name must not
        # rename it — only identifiers in identifier positions are put back, never data keyed `name`.
        restore_identifiers(masked, doc)
        return masked, None

    def exempt(self, identity: Identity | None) -> bool:
        e = self.settings.exempt
        if identity is None:
            return False
        return any(fnmatch.fnmatchcase(identity.user, u) for u in e.users) or any(
            fnmatch.fnmatchcase(g, p) for g in identity.groups for p in e.groups
        )


def _masking(flow: Flow) -> Masking | None:
    masking = flow.connection.state.get(PLUGIN_NAME)
    if masking is None or flow.state.get(PLUGIN_NAME, {}).get("exempt"):
        return None
    return masking


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


# -- transformers -----------------------------------------------------------------------------------------


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
            return _withheld(self.masking, self.flow, self.broken)
        if self.size > self.masking.settings.max_body_bytes:
            return _withheld(
                self.masking, self.flow, f"larger than {self.masking.settings.max_body_bytes} bytes"
            )
        if not body.strip(b" \t\r\n"):
            return body
        try:
            doc = parse_json(body)
        except ValueError:
            return _withheld(self.masking, self.flow, "not valid JSON")
        resource_kind = KIND_OF_RESOURCE.get(self.flow.attributes.resource, "")
        # Never upstream's bytes, even when nothing changed: a client parser reading duplicate keys
        # first-wins, or escapes differently, would see something other than what was checked.
        if self.render == YAML_FORM:
            return to_yaml(self.masking.mask_doc(doc, resource_kind))
        # The newline is the one the API server's encoder writes.
        return self.masking.mask_json(doc, resource_kind) + b"\n"


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
            return _withheld(self.masking, self.flow, "a watch event is not valid JSON") + b"\n"
        return self.masking.mask_json(event, self.kind) + b"\n"  # re-serialized even when unchanged

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
                return _withheld(self.masking, self.flow, why) + b"\n"
        data = self.pending + chunk
        lines = data.split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > self.masking.settings.max_body_bytes:
            self.pending = b""
            return _withheld(self.masking, self.flow, "a watch event is too large") + b"\n"
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


def _withheld(masking: Masking, flow: Flow, why: str) -> bytes:
    """The `Status` body sent instead of a response that could not be masked (recorded for the audit)."""
    flow.state.setdefault(PLUGIN_NAME, {})["withheld"] = why
    log.warning("masking on %s: withheld a response to %s: %s", flow.connection.name, flow.request.path, why)
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": f"kubegate withheld this response: it could not be masked ({why})",
                       "reason": "InternalError", "code": 502}).encode()  # fmt: skip


# -- hooks ------------------------------------------------------------------------------------------------


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return MaskingSettings


@hookimpl
def kubegate_startup(gateway: Gateway) -> None:
    for connection in gateway.connections:
        settings = connection.settings_for(PLUGIN_NAME)
        if isinstance(settings, MaskingSettings):
            masking = Masking(settings)
            connection.state[PLUGIN_NAME] = masking
            k = settings.known_values
            if k.enabled:
                masking.known = KnownSecrets(connection, k.namespaces, k.min_length, k.max_values,
                                             k.max_value_bytes, masking.known_changed)  # fmt: skip
                masking.known.start()


@hookimpl
async def kubegate_decide(flow: Flow) -> Decision | None:
    """Deny the writes that would read a masked Secret value back out (see `writes.py`)."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    if masking is None or masking.exempt(flow.identity):
        return None
    return await writes.decide(flow, (masking.settings.marker, masking.rules.marker_b64))


@hookimpl
async def kubegate_shutdown(gateway: Gateway) -> None:
    for connection in gateway.connections:
        masking = connection.state.get(PLUGIN_NAME)
        if isinstance(masking, Masking) and masking.known is not None:
            await masking.known.close()
        if isinstance(masking, Masking):
            await masking.known_index.close()


@hookimpl
def kubegate_upstream_request(flow: Flow) -> None:
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


@hookimpl
def kubegate_response_headers(flow: Flow) -> None:
    masking = _masking(flow)
    if masking is None:
        return
    negotiated: Negotiated | None = flow.state.get(NEGOTIATED)
    headers = flow.response.headers
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "").lower()
    encoding = next((v for k, v in headers if k.lower() == "content-encoding"), "").lower()
    mode = "pass"
    path = flow.request.path
    if flow.response.status in (101, 204, 304):
        mode = "pass"
    elif not flow.attributes.is_resource_request and (
        path in ("/api", "/apis") or path.startswith(PASS_PATHS)
    ):
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


@hookimpl
def kubegate_response_stream(flow: Flow) -> Any:
    masking = _masking(flow)
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
    return Withhold(_withheld(masking, flow, f"content type {state.get('content_type') or 'unknown'}"))


@hookimpl
def kubegate_stream_frame(flow: Flow, session: Session, frame: Frame) -> None:
    masking = _masking(flow)
    if masking is None or frame.direction != FrameDirection.UPSTREAM_TO_CLIENT:
        return
    if flow.attributes.subresource not in ("exec", "attach"):
        return
    # One streaming masker per output channel for the whole session (stream.py): a secret split across
    # frames is held until it is complete, or until no frame came for `exec_hold_ms` (then it goes out as
    # it stands, and the rest of it is masked when it comes). Base64 protocols (`base64.channel.k8s.io`,
    # `v4.base64…`; web terminals): text frames, a digit for the channel, then the data in base64.
    base64_frames = "base64" in session.subprotocol
    output: ChannelMaskers | None = session.state.get(PLUGIN_NAME)
    if output is None:
        output = session.state[PLUGIN_NAME] = ChannelMaskers(
            masking.text, masking.settings.max_secret_bytes, masking.settings.exec_hold_from, base64_frames
        )
    output.use(masking.text)  # the known values may have changed since the last frame
    if frame.flush:
        # Timer tick or end of stream: what is held goes out now.
        held = output.flush()
        if held:
            frame.before, frame.data, frame.text = held[:-1], held[-1], base64_frames
        return
    if frame.text != base64_frames:
        # Not this protocol's kind of frame (a text frame on a binary protocol): no channel to carry for,
        # masked as it stands rather than passed unread.
        frame.data = masking.text.mask_bytes(frame.data)
        return
    channel, data = _channel_data(frame, base64_frames)
    if channel in (1, 2):
        if data is None:  # not base64 after all: nothing of it goes out unread
            frame.data = frame.data[:1]
            return
        out = output.output(channel, data)
        if out is None:
            frame.drop = True
        else:
            frame.data = out
        if output.holding:
            session.flush_after = masking.settings.exec_hold_ms / 1000
        return
    # Another channel (the exit status, a v5 close): whatever stdout/stderr still hold goes out before it.
    frame.before = output.flush()


def _channel_data(frame: Frame, base64_frames: bool) -> tuple[int | None, bytes | None]:
    """A frame's channel and data (None when a base64 frame's data is not base64)."""
    if not frame.data:
        return None, b""
    if not base64_frames:
        return frame.data[0], frame.data[1:]
    digit = frame.data[:1]
    if not digit.isdigit():
        return None, None
    try:
        return int(digit), base64.b64decode(frame.data[1:], validate=True)
    except ValueError:
        return int(digit), None


def mask_body_for_record(flow: Flow, body: bytes) -> str:
    """A request body as it may be shown or stored (approvals, audit): masked JSON whatever its shape (an
    object, a List, a JSON/merge/strategic-merge/apply patch; JSON, YAML, or protobuf of a kind the decoder
    knows), else only its size and hash. See `records.py` for what each shape gets."""
    import hashlib

    decoded = _decode_for_record(flow, body)
    if decoded is None:
        digest = hashlib.sha256(body).hexdigest()[:16]
        return f"<{len(body)} bytes, not decoded, sha256 {digest}…>" if body else ""
    shape, doc = decoded
    # Shown to people and stored: masked even where the connection does not mask its responses.
    attrs = flow.attributes
    rules = _record_masking(flow).rules
    # A write's body is an object of the resource's kind; a DELETE's is DeleteOptions.
    write = flow.request.method.upper() in bodies.WRITE_METHODS
    kind = KIND_OF_RESOURCE.get(attrs.resource, "") if write else ""
    masked = records.mask_record_document(doc, shape, rules, kind, attrs.namespace, attrs.name)
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


@hookimpl
def kubegate_record_body(flow: Flow, body: bytes) -> str | None:
    return mask_body_for_record(flow, body)


def mask_command_for_record(flow: Flow, argv: list[str]) -> list[str]:
    """An exec/attach command line as records keep it (approvals, session rows, recording titles): each
    argument masked by the connection's text rules, secret-named variables and flags, and clients' password
    options (see `records.mask_command`); the default rules where the connection does not mask."""
    masking = _record_masking(flow)
    return records.mask_command(argv, masking.text.mask, masking.env_name, masking.settings.marker)


def mask_query_for_record(flow: Flow, query: str) -> str | None:
    """A query string with its `command` parameters masked as `mask_command_for_record` masks them and the
    other parameters by the text rules (a proxied `?token=…`); None when nothing in it needed masking."""
    text_mask = _record_masking(flow).text.mask
    return records.mask_command_query(query, lambda argv: mask_command_for_record(flow, argv), text_mask)


@hookimpl
def kubegate_record_query(flow: Flow, query: str) -> str | None:
    return mask_query_for_record(flow, query)


@hookimpl
def kubegate_record_command(flow: Flow, argv: list[str]) -> list[str]:
    return mask_command_for_record(flow, argv)


@hookimpl
def kubegate_record_text(flow: Flow, data: bytes) -> bytes:
    return mask_text_for_record(flow, data)


@hookimpl
def kubegate_audit_fields(flow: Flow) -> dict[str, Any]:
    """The audit event's `masking`: how the response was masked (mode, form, encoding), or that the caller
    was exempt; None when the connection does not mask."""
    return {"masking": flow.state.get(PLUGIN_NAME)}


def _record_masking(flow: Flow) -> Masking:
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    return masking or _default_masking()


def mask_text_for_record(flow: Flow, data: bytes) -> bytes:
    """Text as it may be stored (session recordings: typed input, output of exempt callers): masked by
    known values and patterns with the connection's masking, or the default rules where it has none."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    return (masking or _default_masking()).text.mask_bytes(data)


@functools.cache
def _default_masking() -> Masking:
    return Masking(MaskingSettings())
