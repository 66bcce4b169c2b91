"""Read a write request's body the way the Kubernetes API server reads it — or refuse it.

Everything that judges or shows a request body (policy conditions, masking, approvals, audit) reads it
through `decode_write_body`, so that what the gateway judged is what the API server will act on. Where the
API server and a Python parser could read the same bytes differently, the body is refused (`BodyError`):

- Content-Type: the first header value. POST/PUT: `mime.ParseMediaType` (parameters ignored, lower-cased,
  empty → `application/json`) and one of the server's serializers: `application/json`, `application/yaml`,
  `application/vnd.kubernetes.protobuf` (handlers/negotiation `NegotiateInputSerializer`). PATCH: the value
  cut at the first `;`, compared exactly (handlers/patch.go): `application/json-patch+json`,
  `application/merge-patch+json`, `application/strategic-merge-patch+json`, `application/apply-patch+yaml`.
- CBOR (`application/cbor`, `application/apply-patch+cbor`; behind feature gates upstream) is not decoded:
  it is refused with status 415, on which client-go retries the request as JSON.
- JSON: strict UTF-8, no duplicate object keys (sigs.k8s.io/json would take the last; a Python reader the
  first — either way two readers disagree), no NaN/Infinity, no unpaired surrogate escapes (Go reads
  U+FFFD), nothing after the value. Keys are kept as sent:
  Kubernetes' JSON decoder matches field names case-sensitively, so `Spec` is not `spec` for it either.
- YAML: read as sigs.k8s.io/yaml reads it (goyaml.v2, YAML 1.1, then to JSON): plain scalars resolve by
  goyaml.v2's rules (`y`/`n`/`on`/`off` are booleans, `1:30` and timestamps stay strings, `0o17`/`1e3` are
  numbers); bool and int keys become strings. Refused: more than one document, duplicate keys, merge keys
  (`<<`), explicit tags other than the core ones, aliases that expand past `MAX_ALIAS_NODES` nodes or
  `MAX_ALIAS_CHARACTERS` characters of values, NaN/Inf, float or null keys.
- Protobuf: `kubegate.core.protobuf.decode_body(strict=True)`: a kind without a schema, or any field
  number the schema lacks, is refused by name.
- Every body must be an object (a JSON patch: a list of operation objects); empty bodies are refused.
- JSON patch pointers (`path`, `from`) must be RFC 6901 pointers that the API server's JSON patch library
  (gopkg.in/evanphx/json-patch.v4, handlers/patch.go `applyJSPatch`) reads as RFC 6901 does: it splits a
  pointer on `/` and drops the first piece whatever it is, so `x/data/password` is `/data/password` there
  while a condition or masking reading it as a pointer sees no `/data`. Refused: a pointer that does not
  start with `/`, the empty pointer (the whole document to RFC 6901 and v5, an error to v4), an empty
  reference token (`/spec//x`: v5 reads it as the token before it), and a `~` not followed by `0` or `1`
  (invalid to RFC 6901, a literal `~` to Go). `json_patch_problem` says why, for the gateway's own 400.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from kubegate.core import protobuf

Shape = Literal["object", "json-patch", "merge-patch", "strategic-merge-patch", "apply-patch"]

JSON = "application/json"
YAML = "application/yaml"
PROTOBUF = "application/vnd.kubernetes.protobuf"
CBOR = "application/cbor"
APPLY_CBOR = "application/apply-patch+cbor"

# POST/PUT media types the API server has a serializer for (CBOR: see the module docstring)
OBJECT_MEDIA_TYPES = (JSON, YAML, PROTOBUF)
PATCH_MEDIA_TYPES: dict[str, Shape] = {
    "application/json-patch+json": "json-patch",
    "application/merge-patch+json": "merge-patch",
    "application/strategic-merge-patch+json": "strategic-merge-patch",
    "application/apply-patch+yaml": "apply-patch",
}
WRITE_METHODS = ("POST", "PUT", "PATCH")
MAX_ALIAS_NODES = 10_000  # nodes a YAML document may reach through aliases (a "billion laughs" is refused)
# Characters of scalars a YAML document may reach through aliases: a few aliases of one large scalar stay
# shared as a parsed object but are copied out whole when it is serialised (masking, records, JSON to
# upstream): 10,000 aliases of a 500 KB value were 5 GB of JSON from one request.
MAX_ALIAS_CHARACTERS = 4 << 20


class BodyError(ValueError):
    """The body cannot be read the way the API server reads it (message says why).

    `status` is the HTTP status the API server would answer: 415 for a content type it has no decoder for
    (client-go retries CBOR as JSON on 415), 400 for a body it cannot decode."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Body:
    media_type: str  # e.g. "application/json", "application/strategic-merge-patch+json"
    shape: Shape
    doc: Any  # JSON-shaped Python value: the object, or the patch document (a list for json-patch)


def decode_write_body(method: str, content_type: str, body: bytes) -> Body:
    """Decode the body of a POST, PUT or PATCH as the API server would, or raise `BodyError`.

    `content_type` is the request's first Content-Type header value ("" when it has none). The result's
    `doc` is what the API server acts on: the object for POST/PUT (and for a protobuf body its JSON form),
    the patch document for PATCH.
    """
    method = method.upper()
    if method == "PATCH":
        media_type = patch_media_type(content_type)
        shape = PATCH_MEDIA_TYPES[media_type]
    elif method in ("POST", "PUT"):
        media_type, shape = object_media_type(content_type), "object"
    else:
        raise BodyError(f"a {method} request carries no object the API server reads")
    if not body:
        raise BodyError("the request body is empty")
    if media_type == PROTOBUF:
        try:
            doc: Any = protobuf.decode_body(body, strict=True)
        except protobuf.UnsupportedKind as exc:
            raise BodyError(str(exc), 415) from None
        except (protobuf.ProtobufError, UnicodeDecodeError) as exc:
            raise BodyError(f"the protobuf body cannot be read: {exc}") from None
    elif media_type in (YAML, "application/apply-patch+yaml"):
        doc = decode_yaml(body)
    else:
        doc = decode_json(body)
    if media_type != PROTOBUF:
        _no_lone_surrogates(doc)
    if shape == "json-patch":
        if not isinstance(doc, list) or not all(isinstance(op, dict) for op in doc):
            raise BodyError("a JSON patch must be a list of operation objects")
        problem = pointer_problem(doc)
        if problem:
            raise BodyError(problem)
    elif not isinstance(doc, dict):
        what = "object" if shape == "object" else "patch"
        raise BodyError(f"the {what} must be a JSON object, not {_json_type(doc)}")
    return Body(media_type, shape, doc)


def object_media_type(content_type: str) -> str:
    """The media type a POST/PUT body is decoded as (Go's mime.ParseMediaType; parameters ignored)."""
    value = content_type.strip()
    if not value:
        return JSON
    media, *params = value.split(";")
    media = media.strip().lower()
    if params and not params[-1].strip():
        params.pop()  # Go ignores one trailing semicolon
    if not _TOKEN_TYPE.fullmatch(media) or not all(_PARAMETER.fullmatch(p) for p in params):
        raise BodyError(f"the Content-Type {content_type!r} is not a valid media type", 415)
    if media in (CBOR, APPLY_CBOR):
        raise BodyError(f"{media} bodies are not accepted through the gateway; send JSON", 415)
    if media not in OBJECT_MEDIA_TYPES:
        raise BodyError(
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{', '.join(OBJECT_MEDIA_TYPES)} (got {media!r})",
            415,
        )
    return media


def patch_media_type(content_type: str) -> str:
    """The patch type of a PATCH (handlers/patch.go: cut at the first `;`, then an exact, case-sensitive
    match — so `Application/Merge-Patch+json` or a space before `;` is refused there, and here)."""
    value = content_type
    at = value.find(";")
    if at > 0:
        value = value[:at]
    if value == APPLY_CBOR:
        raise BodyError(f"{APPLY_CBOR} patches are not accepted through the gateway; send YAML", 415)
    if value not in PATCH_MEDIA_TYPES:
        raise BodyError(
            f"the patch type {value!r} is not supported - accepted: {', '.join(PATCH_MEDIA_TYPES)}", 415
        )
    return value


# ---------------------------------------------------------------------------------------------------------
# JSON patch pointers, as gopkg.in/evanphx/json-patch reads them
# ---------------------------------------------------------------------------------------------------------

JSON_PATCH = "application/json-patch+json"
_INVALID_ESCAPE = re.compile(r"~(?![01])")


def pointer_problem(ops: list[Any]) -> str | None:
    """Why a JSON patch's pointers could be read differently by the API server and by a condition or
    masking (see the module docstring), or None. Non-string pointers are left to the readers: Go fails the
    operation, and conditions and masking fail closed on them."""
    for index, op in enumerate(ops):
        if not isinstance(op, dict):
            continue
        for key in ("path", "from"):
            pointer = op.get(key)
            if not isinstance(pointer, str):
                continue
            where = f"the JSON patch's {key} {pointer!r} (operation {index})"
            if pointer == "":
                return (
                    f"{where} is empty: RFC 6901 reads it as the whole document, the API server's JSON "
                    "patch library as no path; name the field"
                )
            if not pointer.startswith("/"):
                read_as = "/" + pointer.partition("/")[2]
                return (
                    f"{where} does not start with '/': the API server's JSON patch library drops its first "
                    f"segment and would read it as {read_as!r}; send an RFC 6901 pointer"
                )
            if "//" in pointer or pointer.endswith("/"):
                return f"{where} has an empty segment, which JSON patch libraries read differently"
            if _INVALID_ESCAPE.search(pointer):
                return f"{where} has a '~' that is not '~0' or '~1' (RFC 6901 refuses it, Go keeps it)"
    return None


def json_patch_problem(content_type: str, body: bytes) -> str | None:
    """`pointer_problem` of a PATCH body when `content_type` (the first Content-Type value, as the API server
    reads it) makes it a JSON patch; None for anything else, and for a body that is not a JSON list of
    objects (the readers that judge bodies refuse those themselves)."""
    try:
        if patch_media_type(content_type) != JSON_PATCH:
            return None
        ops = decode_json(body)
    except BodyError:
        return None
    if not isinstance(ops, list):
        return None
    return pointer_problem(ops)


_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_TOKEN_TYPE = re.compile(f"{_TOKEN}/{_TOKEN}")
_PARAMETER = re.compile(rf'\s*{_TOKEN}\s*=\s*({_TOKEN}|"[^"\\]*")\s*')


def _no_lone_surrogates(doc: Any) -> None:
    """`"\\ud800"` escapes: Go's decoders turn an unpaired surrogate into U+FFFD, Python keeps it — refused."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError("the body has an unpaired UTF-16 surrogate escape") from None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    return "a number"


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not valid UTF-8 (at byte {exc.start})") from None


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


def decode_json(body: bytes) -> Any:
    """One JSON value, read strictly (see the module docstring); raises BodyError."""
    text = _utf8(body)
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# YAML, as goyaml.v2 (sigs.k8s.io/yaml) reads it
# ---------------------------------------------------------------------------------------------------------

_PLAIN = "!kubegate/plain"  # the tag our resolver gives untagged plain scalars; goyaml.v2's rules apply
_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}


class _Loader(yaml.SafeLoader):
    """PyYAML's parser and composer only: scalars are resolved below, by goyaml.v2's rules."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return _PLAIN
        if kind is yaml.ScalarNode:
            return _CORE + "str"
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]  # untyped in PyYAML's stubs


_GO_BOOL = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False),
}
_GO_NULL = {"", "~", "null", "Null", "NULL"}
_GO_SPECIAL_FLOAT = {".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
                     "-.Inf", "-.INF"}  # fmt: skip
_YAML_STYLE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", re.ASCII)
_GO_INT = re.compile(r"0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*", re.ASCII)
# goyaml.v2 tries timestamps before numbers: these stay strings (YAMLToJSON keeps timestamps as text)
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    r"([Tt ]|[ \t]+)?([0-9]{1,2}:[0-9]{2}:[0-9]{2}(\.[0-9]*)?)?"
    r"([ \t]*(Z|[-+][0-9]{1,2}(:[0-9]{2})?))?",
    re.ASCII,
)


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64), then ParseUint (no sign) — as goyaml.v2's resolve tries them."""
    sign, digits = 1, text
    if digits[:1] in ("+", "-"):
        sign, digits = (-1 if digits[0] == "-" else 1), digits[1:]
    if not _GO_INT.fullmatch(digits):
        return None
    prefix = digits[:2].lower()
    if prefix in ("0x", "0o", "0b"):
        value = int(digits[2:], {"0x": 16, "0o": 8, "0b": 2}[prefix])
    elif digits.startswith("0") and len(digits) > 1:
        value = int(digits[1:], 8)
    else:
        value = int(digits)
    value *= sign
    if -(1 << 63) <= value < (1 << 63):
        return value
    if text[:1] not in ("+", "-") and value < (1 << 64):
        return value
    return None


def _number(value: float) -> Any:
    """A float as it comes back from YAMLToJSON's JSON text: whole numbers are integers again."""
    if math.isnan(value) or math.isinf(value):
        raise BodyError("NaN and infinite numbers cannot be sent as JSON (YAMLToJSON refuses them)")
    if value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _plain_scalar(text: str) -> Any:
    """goyaml.v2's resolve() for an untagged plain scalar."""
    if text in _GO_BOOL:
        return _GO_BOOL[text]
    if text in _GO_NULL:
        return None
    if text in _GO_SPECIAL_FLOAT:
        return _number(float(text.replace(".", "")))
    first = text[0]
    if first == ".":
        if re.fullmatch(r"\.[0-9]+([eE][-+]?[0-9]+)?", text, re.ASCII):
            parsed = float(text)
            return text if math.isinf(parsed) else _number(parsed)
        return text
    if first in "+-0123456789":
        if _TIMESTAMP.fullmatch(text):
            return text
        plain = text.replace("_", "")
        as_int = _go_int(plain)
        if as_int is not None:
            return as_int
        if _YAML_STYLE_FLOAT.fullmatch(plain):
            parsed = float(plain)
            return text if math.isinf(parsed) else _number(parsed)  # ParseFloat range error: a string
        if plain.startswith(("0b", "-0b")):
            try:
                return int(plain.replace("0b", "", 1), 2)
            except ValueError:
                return text
    return text


def _tagged_scalar(tag: str, text: str) -> Any:
    if tag == _CORE + "str":
        return text
    if tag == _CORE + "null":
        return None
    resolved = _plain_scalar(text)
    kind = tag.rsplit(":", 1)[1]
    fits = {
        "int": isinstance(resolved, int) and not isinstance(resolved, bool),
        "float": isinstance(resolved, (int, float)) and not isinstance(resolved, bool),
        "bool": isinstance(resolved, bool),
    }[kind]
    if not fits:
        raise BodyError(f"the YAML value {text!r} is not a valid {kind}")
    return resolved


def _json_key(key: Any, node: yaml.Node) -> str:
    """YAMLToJSON's conversion of a map key (goyaml.v2 decodes keys like values)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    raise BodyError(f"the YAML map key at line {node.start_mark.line + 1} is {_json_type(key)}")


class _Builder:
    def __init__(self) -> None:
        self.aliased = 0
        self.aliased_characters = 0

    def build(self, node: yaml.Node, through_alias: bool, seen: dict[int, int]) -> Any:
        # a node reached again is an alias: count what it expands to (PyYAML shares the node objects)
        key = id(node)
        if key in seen or through_alias:
            through_alias = True
            self.aliased += 1
            if self.aliased > MAX_ALIAS_NODES:
                raise BodyError(f"the YAML aliases expand to more than {MAX_ALIAS_NODES} nodes")
        seen[key] = seen.get(key, 0) + 1
        tag = node.tag
        if tag != _PLAIN and tag not in _ALLOWED_TAGS:
            raise BodyError(f"the YAML tag {tag!r} (line {node.start_mark.line + 1}) is not accepted")
        if isinstance(node, yaml.ScalarNode):
            if through_alias:
                self.aliased_characters += len(node.value)
                if self.aliased_characters > MAX_ALIAS_CHARACTERS:
                    raise BodyError(
                        f"the YAML aliases expand to more than {MAX_ALIAS_CHARACTERS} characters of values"
                    )
            if tag == _PLAIN:
                return _plain_scalar(node.value)
            return _tagged_scalar(tag, node.value)
        if isinstance(node, yaml.SequenceNode):
            if tag != _CORE + "seq":
                raise BodyError(f"the YAML tag {tag!r} does not fit a sequence")
            return [self.build(child, through_alias, seen) for child in node.value]
        if tag != _CORE + "map":
            raise BodyError(f"the YAML tag {tag!r} does not fit a mapping")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag in (_PLAIN, _CORE + "merge") and key_node.value == "<<":
                raise BodyError(f"YAML merge keys (<<, line {key_node.start_mark.line + 1}) are not accepted")
            if not isinstance(key_node, yaml.ScalarNode):
                raise BodyError(f"the YAML map key at line {key_node.start_mark.line + 1} is not a scalar")
            name = _json_key(self.build(key_node, through_alias, seen), key_node)
            if name in out:
                raise BodyError(
                    f"duplicate key {name!r} in a YAML mapping (line {key_node.start_mark.line + 1})"
                )
            out[name] = self.build(value_node, through_alias, seen)
        return out


def decode_yaml(body: bytes) -> Any:
    """One YAML document as sigs.k8s.io/yaml's YAMLToJSON would turn it into JSON; raises BodyError."""
    text = _utf8(body)
    try:
        documents = list(yaml.compose_all(text, Loader=_Loader))
    except RecursionError:
        raise BodyError("the YAML body is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise BodyError(f"the body is not valid YAML: {' '.join(str(exc).split())}") from None
    if len(documents) > 1:
        raise BodyError(
            f"the YAML body has {len(documents)} documents; the API server reads only the first, so one is"
            " accepted"
        )
    if not documents or documents[0] is None:
        return None
    try:
        return _Builder().build(documents[0], False, {})
    except RecursionError:
        raise BodyError("the YAML body is nested too deeply") from None
