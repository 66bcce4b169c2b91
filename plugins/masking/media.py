"""What a masked connection serves, and how it asks upstream: the client's `Accept` negotiated as the API
server negotiates it, JSON only asked of the API server, YAML rendered by the gateway after masking.

The API server (k8s.io/apiserver pkg/endpoints/handlers/negotiation) sorts the Accept clauses by `q`
(highest first, then specific types before wildcards), skips any serializer whose most specific matching
clause has `q=0`, and serves the first clause that matches a serializer it has — in its order: JSON, YAML,
protobuf (CBOR) — with that clause's parameters (`as=Table;g=meta.k8s.io;v=v1` …); nothing matching is a 406
NotAcceptable. An absent Accept is JSON, and so is `*/*` or `application/*`. A watch streams JSON or
protobuf only: YAML has no stream serializer.

A masked connection serves JSON and YAML (protobuf and CBOR it cannot read to mask): it asks upstream for
the JSON form of every clause it could serve (a YAML clause becomes the same clause in JSON), masks the
JSON, and renders YAML itself when the client's best acceptable form is YAML.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import yaml

JSON_FORM, YAML_FORM = "json", "yaml"
# What a masked connection serves, in the API server's order of serializers.
SERVED = (("application", "json", JSON_FORM), ("application", "yaml", YAML_FORM))
CONTENT_TYPES = {JSON_FORM: "application/json", YAML_FORM: "application/yaml"}


class NotAcceptable(Exception):
    """Nothing the client accepts can be served masked: answered as the API server's 406."""


@dataclass(frozen=True)
class MediaRange:
    """One clause of an Accept header, as goautoneg parses it."""

    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    q: float

    def matches(self, type_: str, subtype: str) -> bool:
        return (self.type, self.subtype) in ((type_, subtype), (type_, "*"), ("*", "*"))

    def specificity(self, type_: str, subtype: str) -> int:
        """2 exact, 1 `type/*`, 0 `*/*`, -1 no match (the API server's clauseSpecificity)."""
        if (self.type, self.subtype) == (type_, subtype):
            return 2
        if (self.type, self.subtype) == (type_, "*"):
            return 1
        return 0 if (self.type, self.subtype) == ("*", "*") else -1

    def param(self, name: str) -> str:
        return next((value for key, value in self.params if key == name), "")


def parse_accept(header: str) -> list[MediaRange]:
    """Accept clauses sorted as the API server sorts them: `q` descending, then specific before wildcard
    (stable, so the client's order breaks ties). A clause without `/` other than `*` is ignored; an
    unparsable `q` is 0 (Go's ParseFloat error value), i.e. "not acceptable". Media types are compared in
    lower case (RFC 9110), parameter names as written but lower-cased."""
    clauses = []
    for part in header.split(","):
        pieces = part.strip().split(";")
        media = pieces[0].strip().lower()
        if media == "*":
            media = "*/*"
        if media.count("/") != 1:
            continue
        type_, subtype = (piece.strip() for piece in media.split("/"))
        params: list[tuple[str, str]] = []
        q = 1.0
        for piece in pieces[1:]:
            key, eq, value = piece.partition("=")
            if not eq:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            else:
                params.append((key, value))
        clauses.append(MediaRange(type_, subtype, tuple(params), q))
    return sorted(clauses, key=lambda c: (-c.q, c.type == "*", c.subtype == "*"))


@dataclass(frozen=True)
class Negotiated:
    """The outcome: the form the client gets, the Accept sent upstream, and which form each JSON variant
    upstream may answer with maps to (`as` parameter → form, in preference order)."""

    form: str
    upstream_accept: str
    forms_by_as: tuple[tuple[str, str], ...]

    def form_for(self, content_type: str) -> str:
        """The form to render an upstream JSON answer in: the first acceptable clause asking for what
        upstream answered (a Table, say), else the client's best."""
        answered = _as_param(content_type)
        return next((form for as_, form in self.forms_by_as if as_ == answered), self.form)


# Clients send the same few Accept headers over and over: their negotiation is remembered (its parse was a
# third of masking's cost on a small GET, issue 15). The header is the client's: at most 256 of them, each
# short, are kept; a long one is negotiated each time.
CACHED_ACCEPT_CHARS = 512


def negotiate(header: str, *, watch: bool) -> Negotiated:
    """Negotiate a masked response with the client's Accept (raises `NotAcceptable`)."""
    if len(header) <= CACHED_ACCEPT_CHARS:
        return _negotiate_cached(header, watch)
    return _negotiate(header, watch)


@functools.lru_cache(maxsize=256)
def _negotiate_cached(header: str, watch: bool) -> Negotiated:
    return _negotiate(header, watch)


def _negotiate(header: str, watch: bool) -> Negotiated:
    if not header.strip():
        return Negotiated(JSON_FORM, "application/json", (("", JSON_FORM),))
    clauses = parse_accept(header)
    rejected = {
        form: _most_specific_q(clauses, type_, subtype) <= 0
        for type_, subtype, form in SERVED
        if any(c.matches(type_, subtype) for c in clauses)
    }
    candidates: list[tuple[MediaRange, str]] = []
    for clause in clauses:
        if clause.q <= 0:
            continue
        for type_, subtype, form in SERVED:
            if rejected.get(form) or not clause.matches(type_, subtype):
                continue
            stream = clause.param("stream")
            if stream and (stream != "watch" or form != JSON_FORM):  # YAML has no stream serializer
                continue
            candidates.append((clause, form))
    if watch:
        # The API server takes the best clause; a watch in YAML is refused, not served in JSON instead.
        if candidates and candidates[0][1] != JSON_FORM:
            candidates = []
        served = "application/json;stream=watch"
    else:
        served = "application/json, application/yaml"
    if not candidates:
        raise NotAcceptable(f"only the following media types are accepted: {served}")
    upstream: dict[str, str] = {}  # the JSON clause without q → with it (the first, highest q, is kept)
    for clause, _ in candidates:
        base = ";".join(["application/json", *(f"{k}={v}" for k, v in clause.params)])
        upstream.setdefault(base, base if clause.q == 1 else f"{base};q={clause.q:g}")
    return Negotiated(
        candidates[0][1],
        ", ".join(upstream.values()),
        tuple((clause.param("as"), form) for clause, form in candidates),
    )


def _most_specific_q(clauses: list[MediaRange], type_: str, subtype: str) -> float:
    best, q = -1, 1.0
    for clause in clauses:  # sorted by q: on a specificity tie the highest q wins, as in the API server
        specificity = clause.specificity(type_, subtype)
        if specificity > best:
            best, q = specificity, clause.q
    return q


@functools.lru_cache(maxsize=256)  # upstream's Content-Type: the API server's few
def _as_param(content_type: str) -> str:
    """The `as` parameter of upstream's Content-Type (`Table`…), "" without one."""
    return _params(content_type).get("as", "")


def _params(content_type: str) -> dict[str, str]:
    params = {}
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return params


def content_type_for(form: str, upstream_content_type: str) -> str:
    """The Content-Type of a rendered answer: the form's media type with upstream's parameters (`as=Table`…)."""
    _, semicolon, params = upstream_content_type.partition(";")
    return CONTENT_TYPES[form] + (semicolon + params if semicolon else "")


_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def to_yaml(doc: Any) -> bytes:
    """A (masked) JSON document as the API server writes YAML (sigs.k8s.io/yaml JSONToYAML: keys sorted,
    block style, strings that would read as another type quoted)."""
    return yaml.dump(
        doc, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 30
    ).encode()
