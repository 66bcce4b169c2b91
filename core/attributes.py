"""Kubernetes request attributes, read exactly the way the API server reads them.

The gateway is where policy is enforced, so what it decides on must be what the API server acts on. This
module follows the Go sources rule by rule; each rule names the Go function it comes from:

- `net/url`: `parseQuery`, `unescape`, `QueryEscape`, `Values.Encode` (golang/go src/net/url/url.go);
- k8s.io/apiserver `pkg/endpoints/request/requestinfo.go` `RequestInfoFactory.NewRequestInfo` (verb,
  namespace, resource/subresource/name, list/watch, deletecollection);
- k8s.io/apimachinery `pkg/runtime/conversion.go` (`Convert_Slice_string_To_bool` and friends: the FIRST
  value of a repeated parameter wins), `pkg/fields/selector.go` (`ParseSelector`, `RequiresExactMatch`),
  `pkg/api/validation/path` (`IsValidPathSegmentName`);
- kubernetes `pkg/apis/core/v1` generated conversions of `PodExecOptions`, `PodAttachOptions`,
  `PodPortForwardOptions`, `PodLogOptions` from `url.Values`.

Where two readings of one request could differ (a parameter given twice, a `;` Go drops, an invalid escape
Go drops, more parameters than Go parses), the request is refused with `RequestRefused` (400, or 405 for a
method the API server does not serve) instead of guessing. The gateway then forwards `canonical_query`, a
re-encoding of exactly the values it decided on, so what was approved is what upstream receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote_plus, unquote_to_bytes

API_PREFIXES = frozenset({"api", "apis"})
GROUPLESS_PREFIXES = frozenset({"api"})
# Verbs that appear as the first path part after the version (`/api/v1/watch/pods`); `proxy` too.
SPECIAL_VERBS = frozenset({"proxy", "watch"})
SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
# NewRequestInfo's `switch req.Method`: Go method names are case-sensitive, so `post` is not POST.
METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
# Parameters whose Go type is a slice (every value is used, in order): PodExecOptions.Command,
# CreateOptions/UpdateOptions/PatchOptions/DeleteOptions.DryRun, PodPortForwardOptions.Ports. Every other
# parameter is read with its first value only, so a second value is a second reading.
LIST_PARAMETERS = frozenset({"command", "dryRun", "ports"})
# net/url parseQuery (Go ≥ 1.24.x): more than this many `&`-separated pairs and ParseQuery returns no
# values at all (GODEBUG urlmaxqueryparams).
MAX_QUERY_PARAMETERS = 10000
EXEC_SUBRESOURCES = frozenset({"exec", "attach"})
_INT64 = re.compile(r"[+-]?[0-9]+")
# A `%` not followed by two hex digits: Go's unescape refuses it, Python's unquote would keep it as is.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2}).{0,2}", re.S)


class RequestRefused(ValueError):
    """A request the gateway cannot read the way the API server would: answer `code` with a Status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class RequestAttributes:
    """What a Kubernetes request does, in the API server's own terms."""

    path: str
    is_resource_request: bool = False
    verb: str = ""
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)
    # The query as Go's url.ParseQuery reads it (empty for proxy requests, whose query is the pod's).
    query: dict[str, list[str]] = field(default_factory=dict)
    # What the gateway forwards upstream: Values.Encode() of `query`, or a proxy request's raw query.
    canonical_query: str = ""
    # pods/exec and pods/attach options (PodExecOptions, PodAttachOptions).
    command: list[str] = field(default_factory=list)
    container: str = ""
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    tty: bool = False
    # pods/portforward (PodPortForwardOptions.Ports).
    ports: list[int] = field(default_factory=list)
    # pods/log (PodLogOptions).
    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    since_seconds: int | None = None

    @property
    def resource_path(self) -> str:
        """`pods/exec`-style resource name used by RBAC and policy rules."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def is_streaming_subresource(self) -> bool:
        return self.resource == "pods" and self.subresource in {"exec", "attach", "portforward"}

    @property
    def is_proxy(self) -> bool:
        """A proxy request: its query belongs to the pod/service/node and is passed on as it came."""
        return self.is_resource_request and (self.verb == "proxy" or self.subresource == "proxy")

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "is_resource_request": self.is_resource_request,
            "verb": self.verb,
            "api_group": self.api_group,
            "api_version": self.api_version,
            "namespace": self.namespace,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
        }


# ---------------------------------------------------------------------------------------------------------
# Writes that may create the object
# ---------------------------------------------------------------------------------------------------------

# A server-side apply creates the object when it is missing (handlers/patch.go: apply patches set
# forceAllowCreate); PATCH reads the first Content-Type cut at ";".
APPLY_PATCH_TYPES = frozenset({"application/apply-patch+yaml", "application/apply-patch+cbor"})
# Built-in resources whose registry strategy answers AllowCreateOnUpdate() false (kubernetes
# pkg/registry/*/*/strategy.go, apiextensions-apiserver's CRD and custom resource strategies): a PUT of a
# missing one is a 404. Every other resource may be created by a PUT — services, endpoints, events,
# limitranges, RBAC roles and bindings, leases, runtimeclasses… (their strategies say true) and any the
# gateway does not know: a custom resource cannot be told from an aggregated API's by its path, and an
# aggregated API server may create on update. Only resources whose strategy was read are listed here.
NO_CREATE_ON_UPDATE = frozenset(
    {("", r) for r in ("pods", "configmaps", "secrets", "namespaces", "nodes", "serviceaccounts",
                       "persistentvolumeclaims", "persistentvolumes", "replicationcontrollers",
                       "resourcequotas", "podtemplates")}
    | {("apps", r) for r in ("deployments", "statefulsets", "daemonsets", "replicasets")}
    | {("batch", r) for r in ("jobs", "cronjobs")}
    | {("networking.k8s.io", r) for r in ("ingresses", "networkpolicies", "ingressclasses")}
    | {("autoscaling", "horizontalpodautoscalers"), ("policy", "poddisruptionbudgets"),
       ("storage.k8s.io", "storageclasses"), ("scheduling.k8s.io", "priorityclasses"),
       ("discovery.k8s.io", "endpointslices"), ("apiextensions.k8s.io", "customresourcedefinitions")}
    | {("admissionregistration.k8s.io", r)
       for r in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")}
)  # fmt: skip


def may_create(attrs: RequestAttributes, content_types: list[str]) -> bool:
    """Whether the API server may create the object although the request's verb is `patch` or `update`:
    a server-side apply, or a PUT of a resource whose strategy allows create on update. The API server then
    also authorizes the verb `create` (handlers/patch.go and update.go, `createAuthorizerAttributes`) and
    runs admission as CREATE; whether it does depends on whether the object exists, which the gateway
    cannot know. `content_types`: every Content-Type value (the API server reads the first; any apply
    type among them counts, to fail closed)."""
    if not attrs.is_resource_request or attrs.is_proxy:
        return False  # a proxied PUT or PATCH goes to a container, not to an object
    return verb_may_create(attrs.verb, attrs.api_group, attrs.resource, content_types)


def verb_may_create(verb: str, api_group: str, resource: str, content_types: list[str]) -> bool:
    """`may_create` from a resource request's verb, API group and resource (without subresource)."""
    if not resource:
        return False
    if verb == "patch":
        return any(value.split(";")[0].strip().lower() in APPLY_PATCH_TYPES for value in content_types)
    if verb == "update":
        # A subresource's PUT too: its store keeps the resource's strategy (fail closed where it may create)
        return (api_group, resource) not in NO_CREATE_ON_UPDATE
    return False


# ---------------------------------------------------------------------------------------------------------
# net/url
# ---------------------------------------------------------------------------------------------------------


def _unescape(raw: bytes, *, query_component: bool) -> bytes:
    """net/url `unescape`: `%XX` must be two hex digits (else an EscapeError); `+` is a space only in a query
    component (`QueryUnescape`), never in a path (`PathUnescape`)."""
    if query_component and b"+" in raw:
        raw = raw.replace(b"+", b" ")  # before decoding: an escaped %2B stays a plus
    if b"%" not in raw:
        return raw  # the common case, without a pass in Python
    bad = _BAD_ESCAPE.search(raw)
    if bad is not None:
        raise RequestRefused(400, f"invalid URL escape {bad.group().decode('latin-1')!r}")
    return unquote_to_bytes(raw)


def _utf8(data: bytes, what: str) -> str:
    # Go strings are bytes; every Kubernetes client sends UTF-8, so anything else is refused rather than
    # read one way here and another way there.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRefused(400, f"the {what} is not valid UTF-8 once unescaped") from None


def path_unescape(raw_path: str) -> str:
    """net/url `PathUnescape` of an ASCII request path (what Go puts in `req.URL.Path`).

    An invalid `%` escape (Go's server answers 400) or a result that is not UTF-8 is refused with 400.
    """
    return _utf8(_unescape(_raw_bytes(raw_path), query_component=False), "request path")


def _raw_bytes(text: str) -> bytes:
    # From the wire, one character per byte (latin-1); typed text (`kubegate policy check`) may hold more.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def parse_query(raw_query: str) -> dict[str, list[str]]:
    """net/url `parseQuery`, refusing what Go would silently drop.

    Go splits on `&` only; skips empty pairs; cuts each pair at its first `=` (no `=`: empty value); drops
    a pair containing `;` and a pair with an invalid escape (reporting an error the API server ignores);
    and since Go 1.24.x returns no values at all beyond 10000 pairs. Dropped pairs would make the gateway
    and the API server read different requests, so each of those is a 400 here. `raw_query` is the query
    string as received, one character per byte (latin-1).
    """
    data = _raw_bytes(raw_query)
    values: dict[str, list[str]] = {}
    if not data:
        return values
    if data.count(b"&") + 1 > MAX_QUERY_PARAMETERS:
        raise RequestRefused(400, f"the query has more than {MAX_QUERY_PARAMETERS} parameters")
    for pair in data.split(b"&"):
        if b";" in pair:
            raise RequestRefused(400, "the query contains a ';', which the API server ignores with its pair")
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        name = _utf8(_unescape(key, query_component=True), "query")
        values.setdefault(name, []).append(_utf8(_unescape(value, query_component=True), "query"))
    return values


def query_escape(text: str) -> str:
    """net/url `QueryEscape`: everything but ALPHA DIGIT `-_.~` is `%XX` (upper case hex); space is `+`.
    Python's `quote_plus` with nothing extra safe is exactly that (its always-safe set is Go's unreserved)."""
    return text if _UNRESERVED.fullmatch(text) else quote_plus(text, safe="")


def encode_query(values: dict[str, list[str]]) -> str:
    """net/url `Values.Encode`: keys sorted (byte order, which is code point order), values in order."""
    return "&".join(
        f"{query_escape(key)}={query_escape(value)}" for key in sorted(values) for value in values[key]
    )


# ---------------------------------------------------------------------------------------------------------
# k8s.io/apimachinery conversions
# ---------------------------------------------------------------------------------------------------------


def _equal_fold_false(text: str) -> bool:
    # strings.EqualFold(s, "false") with Unicode simple folding: besides ASCII case, only U+017F (long s)
    # folds onto one of these letters (s).
    return len(text) == 5 and all(
        c.lower() == t or (c == "\u017f" and t == "s") for c, t in zip(text, "false", strict=True)
    )


def go_bool(values: list[str]) -> bool:
    """runtime `Convert_Slice_string_To_bool`: absent, `0` or (case-folded) `false` is false; anything else,
    including an empty value (`watch=`), is true. Only the first value counts."""
    if not values:
        return False
    return not (values[0] == "0" or _equal_fold_false(values[0]))


def _go_lower_bool(values: list[str]) -> bool:
    # NewRequestInfo's fallback when ListOptions do not decode, and Convert_Slice_string_To_bool before it
    # used strings.EqualFold: `switch strings.ToLower(values[0])`.
    return bool(values) and values[0].lower() not in ("false", "0")


def _bool(query: dict[str, list[str]], name: str) -> bool:
    """A boolean parameter, refused when Go's two readings of it differ (only U+017F, the long s, folds to
    `s` for EqualFold but not for ToLower): which one applies depends on the path and the server version."""
    values = query.get(name, [])
    if go_bool(values) != _go_lower_bool(values):
        raise RequestRefused(400, f"{name}={values[0]!r} reads differently to the API server's two decoders")
    return go_bool(values)


def _int64(values: list[str], name: str) -> int | None:
    """runtime `Convert_Slice_string_To_int64` / `_To_Pointer_int64`: strconv.ParseInt(first, 10, 64)."""
    if not values:
        return None
    text = values[0]
    if not _INT64.fullmatch(text) or not -(2**63) <= int(text) < 2**63:
        raise RequestRefused(400, f"{name}: {text!r} is not a 64-bit integer")
    return int(text)


def _ports(values: list[str]) -> list[int]:
    """metav1 `Convert_Slice_string_To_Slice_int32` for PodPortForwardOptions.Ports: every value, split on
    `,`, each strconv.ParseUint(part, 10, 16)."""
    ports = []
    for value in values:
        for part in value.split(","):
            if not part.isascii() or not part.isdigit() or int(part) > 0xFFFF:
                raise RequestRefused(400, f"ports: {part!r} is not a port number")
            ports.append(int(part))
    return ports


def _split_terms(selector: str) -> list[str]:
    """fields `splitTerms`: split on `,` except a backslash-escaped one (the backslash is kept)."""
    if not selector:
        return []
    terms, start, in_slash = [], 0, False
    for index, char in enumerate(selector):
        if in_slash:
            in_slash = False
        elif char == "\\":
            in_slash = True
        elif char == ",":
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return terms


def _split_term(term: str) -> tuple[str, str, str] | None:
    """fields `splitTerm`: the first position where `!=`, `==` or `=` starts (in that order); no trimming."""
    for index in range(len(term)):
        for op in ("!=", "==", "="):
            if term.startswith(op, index):
                return term[:index], op, term[index + len(op) :]
    return None


def _unescape_value(value: str) -> str | None:
    """fields `UnescapeValue`: `\\\\`, `\\,`, `\\=` are escapes; any other escape, a trailing `\\`, or a bare
    `,`/`=` is an error (None)."""
    out, in_slash = [], False
    for char in value:
        if in_slash:
            if char not in "\\,=":
                return None
            out.append(char)
            in_slash = False
        elif char == "\\":
            in_slash = True
        elif char in ",=":
            return None
        else:
            out.append(char)
    return None if in_slash else "".join(out)


def parse_field_selector(selector: str) -> list[tuple[str, str, str]] | None:
    """fields `ParseSelector`: (field, operator, value) terms in Go's order (sorted raw terms), or None when
    it does not parse."""
    terms = []
    for part in sorted(_split_terms(selector)):
        if not part:
            continue
        split = _split_term(part)
        if split is None:
            return None
        lhs, op, rhs = split
        value = _unescape_value(rhs)
        if value is None:
            return None
        terms.append((lhs, op, value))
    return terms


def requires_exact_match(terms: list[tuple[str, str, str]], name: str) -> str | None:
    """Selector `RequiresExactMatch`: the value of the first `=`/`==` term on `name` (andTerm order)."""
    for lhs, op, value in terms:
        if lhs == name and op != "!=":
            return value
    return None


def is_valid_path_segment_name(name: str) -> bool:
    """validation/path `IsValidPathSegmentName`: not `.` or `..`, and no `/` or `%`."""
    return name not in (".", "..") and "/" not in name and "%" not in name


# ---------------------------------------------------------------------------------------------------------
# k8s.io/apiserver RequestInfoFactory.NewRequestInfo
# ---------------------------------------------------------------------------------------------------------


def parse_request(method: str, path: str, query: str) -> RequestAttributes:
    """Read a request as the API server does: `path` is the decoded, connection-relative path (see
    `path_unescape`); `query` the raw query string (one character per byte).

    Raises `RequestRefused` (400/405) for a request the API server could read differently from the gateway,
    and ValueError for a special verb without a target (`/api/v1/watch`), which the API server cannot read
    either. Non-resource requests (`/version`, `/openapi/v3`) get the lower-cased method as verb.
    """
    if method not in METHOD_VERBS:
        # The API server serves no other method; WebSocket upgrades arrive here as GET.
        raise RequestRefused(405, f"the method {method!r} is not allowed")
    info = RequestAttributes(path=path, verb=method.lower())
    _resource_info(info, method, path)
    _refuse_kubelet_sessions(info)
    if info.is_proxy:
        # The API server passes req.URL.RawQuery on to the pod/service/node and reads nothing from it.
        info.canonical_query = query
        return info
    info.query = parse_query(query)
    if info.is_resource_request:
        repeated = sorted(k for k, v in info.query.items() if len(v) > 1 and k not in LIST_PARAMETERS)
        if repeated:
            raise RequestRefused(
                400, f"the query gives {', '.join(repeated)} more than once; the API server reads the first"
            )
    info.canonical_query = encode_query(info.query)
    if info.is_resource_request:
        _list_or_watch(info)
        _subresource_options(info)
    # NewRequestInfo: no name and a delete → deletecollection.
    if not info.name and info.verb == "delete":
        info.verb = "deletecollection"
    return info


def _resource_info(info: RequestAttributes, method: str, path: str) -> None:
    """NewRequestInfo up to the parts: prefix, group, version, special verb, namespace, resource/name/sub."""
    current = _split_path(path)
    if len(current) < 3 or current[0] not in API_PREFIXES:
        return  # non-resource request
    info.api_prefix = current[0]
    current = current[1:]
    if info.api_prefix not in GROUPLESS_PREFIXES:
        if len(current) < 3:
            return  # /apis/GROUP/VERSION discovery is a non-resource request
        info.api_group = current[0]
        current = current[1:]
    info.is_resource_request = True
    info.api_version = current[0]
    current = current[1:]

    if current[0] in SPECIAL_VERBS:
        if len(current) < 2:
            raise ValueError(f"unable to determine kind and namespace from url {path}")
        info.verb = current[0]
        current = current[1:]
    else:
        info.verb = METHOD_VERBS[method]

    if current[0] == "namespaces":
        if len(current) > 1:
            info.namespace = current[1]
            # /namespaces/NS/RESOURCE... is namespaced; /namespaces/NS[/status|finalize] is the namespace itself
            if len(current) > 2 and current[2] not in NAMESPACE_SUBRESOURCES:
                current = current[2:]
    info.parts = current

    if len(current) >= 3 and info.verb not in SPECIAL_VERBS_NO_SUBRESOURCES:
        info.subresource = current[2]
    if len(current) >= 2:
        info.name = current[1]
    if len(current) >= 1:
        info.resource = current[0]


# The kubelet's own API paths that run something in a container or open a session to it
# (pkg/kubelet/server/server.go: InstallDebuggingHandlers), in lower case.
KUBELET_SESSION_PATHS = frozenset({"exec", "attach", "portforward", "run", "checkpoint"})


def _refuse_kubelet_sessions(info: RequestAttributes) -> None:
    """Refuse `nodes/NAME/proxy/{exec,attach,portForward,run,checkpoint}/…` (403): the kubelet's own exec,
    reached as a proxied GET or POST on the node. The API server checks only `nodes/proxy` for it; the
    gateway's exec rules (`pods/exec`, `commands`), approvals, output masking and recording are all bound to
    the pod routes and would see none of it. (Compared in any letter case: go-restful matches exactly, a
    wider refusal costs nothing.)"""
    if info.resource != "nodes" or info.api_group or not info.name or not info.is_proxy:
        return
    rest = info.parts[3:] if info.subresource == "proxy" else info.parts[2:]
    if rest and rest[0].lower() in KUBELET_SESSION_PATHS:
        raise RequestRefused(
            403,
            f"the kubelet's {rest[0]} through nodes/proxy is refused by the gateway: it runs in a container "
            "past every rule, approval, masking and recording bound to pods/exec, attach and port-forward; "
            "use those",
        )


def _split_path(path: str) -> list[str]:
    # requestinfo.go splitPath: trim slashes, split on "/" (empty inner parts stay; the proxy refuses them).
    trimmed = path.strip("/")
    return trimmed.split("/") if trimmed else []


def _list_or_watch(info: RequestAttributes) -> None:
    """NewRequestInfo: no name and a get → list or watch, from ListOptions decoded by the ParameterCodec; and
    a fieldSelector requiring `metadata.name` names the object (when it is a valid path segment name)."""
    if info.name or info.verb != "get":
        return
    query = info.query
    # When ListOptions do not decode, NewRequestInfo falls back to strings.ToLower(first) for watch and sets
    # no name; `_bool` refuses a value those two readings disagree on.
    info.verb = "watch" if _bool(query, "watch") else "list"
    # Integers that fail to decode make the handler answer 400 anyway; refusing here keeps one reading.
    _int64(query.get("limit", []), "limit")
    _int64(query.get("timeoutSeconds", []), "timeoutSeconds")
    selector = query.get("fieldSelector", [""])[0]
    if not selector:
        return
    terms = parse_field_selector(selector)
    if terms is None:
        return  # the ListOptions do not decode: no name (and the handler answers 400)
    name = requires_exact_match(terms, "metadata.name")
    if name is None or not is_valid_path_segment_name(name):
        return
    if query.get("labelSelector", [""])[0]:
        # An invalid labelSelector makes the API server drop the name; the gateway does not parse label
        # selectors, so the two readings could differ: refuse the combination (kubectl never sends it).
        raise RequestRefused(400, "a fieldSelector on metadata.name cannot be combined with a labelSelector")
    info.name = name


def _subresource_options(info: RequestAttributes) -> None:
    """The v1 `Convert_url_Values_To_v1_Pod*Options` conversions: bools and strings from the first value,
    `command` and `ports` from every value, in order, blanks kept."""
    if info.resource != "pods" or not info.name:
        return
    query = info.query
    first = query.get("container", [""])[0]
    if info.subresource in EXEC_SUBRESOURCES:
        if info.subresource == "exec":
            info.command = list(query.get("command", []))
        info.container = first
        info.stdin = _bool(query, "stdin")
        info.stdout = _bool(query, "stdout")
        info.stderr = _bool(query, "stderr")
        info.tty = _bool(query, "tty")
    elif info.subresource == "portforward":
        info.ports = _ports(query.get("ports", []))
    elif info.subresource == "log":
        info.container = first
        info.follow = _bool(query, "follow")
        info.previous = _bool(query, "previous")
        info.timestamps = _bool(query, "timestamps")
        info.tail_lines = _int64(query.get("tailLines", []), "tailLines")
        info.limit_bytes = _int64(query.get("limitBytes", []), "limitBytes")
        info.since_seconds = _int64(query.get("sinceSeconds", []), "sinceSeconds")
