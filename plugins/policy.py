"""The `policy` plugin: ordered rules per connection that allow, deny (guardrails) or require approval.

Evaluation order (documented in docs/policy.md): rules are tried top to bottom; the first rule whose
`match` holds decides. A rule in dry-run mode (or every rule, with `dry_run: true` on the policy) never
decides: what it would have done is recorded in the audit event and evaluation goes on. No rule decides →
the connection's `default` (allow or deny). Within `match`, every given field must hold; a list matches
when any element does; an empty or missing field matches everything. `condition` (CEL) is evaluated last,
only when everything else matched, and reads the request body only then — decoded by
`kubegate.core.bodies` exactly as the API server reads it (for a PATCH, the patch document).

A condition that cannot be evaluated (an evaluation error, a body that cannot be read) fails closed for
`deny` and `approve` rules: the rule applies and its message says why (`on_condition_error`, default
`match` for them, `no_match` for `allow` rules).

A request that may create its object without the verb `create` — a server-side apply, a PUT of a resource
the API server creates on update (`kubegate.core.attributes.may_create`) — is evaluated twice, as `create`
and as its own verb, and the stricter outcome decides (deny > approve > allow; on a tie, the `create`
reading's): the API server authorizes and admits it as a create when the object is missing, which the
gateway cannot know.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import celpy
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kubegate.core.attributes import RequestAttributes, verb_may_create
from kubegate.core.bodies import Body, BodyError, decode_write_body
from kubegate.core.config import private
from kubegate.core.errors import StatusError
from kubegate.core.flow import ApprovalSpec, Decision, Flow, Identity, Verdict
from kubegate.core.plugins import hookimpl

PLUGIN_NAME = "policy"
log = logging.getLogger("kubegate.policy")

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
MAX_CONDITION_BODY_BYTES = 3 * 1024 * 1024


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list, description="User name globs.")
    groups: list[str] = Field(default_factory=list, description="Group globs; any of the identity's groups.")
    methods: list[str] = Field(
        default_factory=list, description="Authentication method globs (`login:*`, `oidc`)."
    )
    claims: dict[str, str] = Field(default_factory=dict, description="Claim name → glob on its value.")
    verbs: list[str] = Field(default_factory=list)
    api_groups: list[str] = Field(default_factory=list, description='API groups; "" is the core group.')
    resources: list[str] = Field(default_factory=list, description="`pods`, `pods/exec`, `pods/*`, `*`.")
    namespaces: list[str] = Field(default_factory=list, description="Namespace globs.")
    names: list[str] = Field(default_factory=list, description="Object name globs.")
    commands: list[str] = Field(
        default_factory=list, description="Globs on an exec's command line (argv joined by spaces)."
    )
    condition: str | None = Field(None, description="CEL expression that must be true.")
    _program: Any = PrivateAttr(None)
    _reads_object: bool = PrivateAttr(False)
    _reads_patch_type: bool = PrivateAttr(False)
    _reads_name: bool = PrivateAttr(False)

    @field_validator("verbs")
    @classmethod
    def _known_verbs(cls, verbs: list[str]) -> list[str]:
        for verb in verbs:
            if verb != "*" and verb not in VERBS:
                raise ValueError(f"unknown verb {verb!r} (known: {', '.join(sorted(VERBS))}, *)")
        return verbs

    @model_validator(mode="after")
    def _compile(self) -> RuleMatch:
        if self.condition:
            try:
                environment = celpy.Environment()
                self._program = environment.program(environment.compile(self.condition))
            except Exception as exc:  # celpy raises its parser's own error types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                raise ValueError(f"invalid CEL condition: {first}") from None
            # the body is read (and must be readable) when the condition can see anything of it
            self._reads_object = any(
                word in self.condition for word in ("object", "contentType", "patchType")
            )
            self._reads_patch_type = "patchType" in self.condition
            # on a create the API server names the request after the object (see `cel_activation`)
            self._reads_name = "name" in self.condition
        return self


class RuleApproval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer_groups: list[str] = Field(min_length=1, description="Who may approve (any of these groups).")
    min_approvals: int = Field(1, ge=1, le=10, description="Distinct reviewers needed.")
    ttl_seconds: int = Field(900, ge=10, le=7 * 86400, description="How long a request waits for review.")
    scope: Literal["once", "window"] = "once"
    window_seconds: int | None = Field(None, ge=60, le=30 * 86400, description="For scope `window`.")

    @model_validator(mode="after")
    def _window(self) -> RuleApproval:
        if self.scope == "window" and self.window_seconds is None:
            raise ValueError("scope window needs window_seconds")
        if self.scope == "once" and self.window_seconds is not None:
            raise ValueError("window_seconds is only for scope window")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    match: RuleMatch = Field(default_factory=lambda: RuleMatch())
    action: Literal["allow", "deny", "approve"]
    message: str = Field("", description="Shown by kubectl for deny; to reviewers for approve.")
    approval: RuleApproval | None = None
    dry_run: bool = Field(False, description="Only record what this rule would have done.")
    on_condition_error: Literal["match", "no_match"] | None = Field(
        None,
        description="When the condition cannot be evaluated (an evaluation error, or a request body that "
        "cannot be read): `match` applies the rule, saying why; `no_match` goes on to the next rule. "
        "Default: `match` for deny and approve rules (fail closed), `no_match` for allow rules.",
    )

    @property
    def matches_on_condition_error(self) -> bool:
        if self.on_condition_error is None:
            return self.action != "allow"
        return self.on_condition_error == "match"

    @model_validator(mode="after")
    def _approval(self) -> Rule:
        if self.action == "approve" and self.approval is None:
            raise ValueError(f"rule {self.name}: action approve needs an approval block")
        if self.action != "approve" and self.approval is not None:
            raise ValueError(f"rule {self.name}: approval is only for action approve")
        return self


class PolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Literal["allow", "deny"] = Field("allow", description="When no rule decides.")
    dry_run: bool = Field(False, description="Every rule only records what it would have done.")
    rules: list[Rule] = Field(default_factory=list)

    _index: RuleIndex | None = PrivateAttr(None)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return rules

    @property
    def index(self) -> RuleIndex:
        """The rules by verb and resource, built once per loaded config (the settings object)."""
        index = cast("RuleIndex | None", private(self, "_index"))  # read twice per request: not self._index
        if index is None:
            index = self._index = RuleIndex(self.rules)
        return index


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """What a rule is matched against: a flow's facts, or those `kubegate policy check` built."""

    identity: Identity
    verb: str
    api_group: str = ""
    api_version: str = ""
    resource: str = ""  # with subresource: pods/exec
    namespace: str = ""
    name: str = ""
    path: str = ""
    command: list[str] = field(default_factory=list)
    body: bytes | None = None  # None: not read (yet)
    method: str = ""  # the HTTP method; "" → the one the verb implies (create POST, update PUT, patch PATCH)
    content_type: str = ""  # the request's Content-Type values, joined by ", " when several
    _decoded: tuple[bytes | None, Body | BodyError | None] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def creates(self) -> bool:
        """The API server may create the object though the verb is patch or update (a server-side apply, a
        PUT of a resource created on update: `kubegate.core.attributes.may_create`): rules for `create`
        judge it too. Derived from the request's own facts, so no caller can forget it."""
        resource, _, subresource = self.resource.partition("/")
        if subresource == "proxy":
            return False  # to a container, not to an object
        return verb_may_create(self.verb, self.api_group, resource, self.content_type.split(","))


@dataclass
class Outcome:
    rule: Rule | None
    action: str  # allow, deny, approve
    reason: str
    dry_run: list[dict[str, str]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # why each rule did or did not match, for `policy check`
    # set when the deciding rule applied because its condition could not be evaluated (fail closed)
    condition_error: str = ""
    # 415 when that was a body in a media type the gateway does not read (client-go retries CBOR as JSON)
    condition_error_status: int = 0
    # "create" when the request may create its object and its reading as a create decided; else ""
    as_verb: str = ""


def _any_glob(patterns: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def _names_of(req: Request) -> tuple[str, ...]:
    """The names a `names` pattern is tried on: the request's name, and for a proxy subresource also the
    object it reaches. A proxy name is `[scheme:]name[:port]` (k8s.io/apimachinery `net.SplitSchemeNamePort`):
    `names: [web]` must hold `pods/web:8080/proxy` too, or the port would step around the rule."""
    if not req.resource.endswith("/proxy"):
        return (req.name,)
    parts = req.name.split(":")
    if len(parts) == 2:
        return (req.name, parts[0])
    if len(parts) == 3 and parts[0] in ("", "http", "https"):
        return (req.name, parts[1])
    return (req.name,)


def _mismatch(match: RuleMatch, req: Request) -> str | None:
    """Why `match` does not hold for `req` (None when everything but the condition matches)."""
    who = req.identity
    if match.users and not _any_glob(match.users, who.user):
        return f"user {who.user} not in {match.users}"
    if match.groups and not any(_any_glob(match.groups, g) for g in who.groups):
        return f"groups {list(who.groups)} not in {match.groups}"
    if match.methods and not _any_glob(match.methods, who.method):
        return f"auth method {who.method} not in {match.methods}"
    for claim, pattern in match.claims.items():
        value = who.claims.get(claim)
        if value is None or not fnmatch.fnmatchcase(str(value), pattern):
            return f"claim {claim}={value!r} does not match {pattern!r}"
    if match.verbs and "*" not in match.verbs and req.verb not in match.verbs:
        return f"verb {req.verb} not in {match.verbs}"
    if match.api_groups and "*" not in match.api_groups and req.api_group not in match.api_groups:
        return f"API group {req.api_group!r} not in {match.api_groups}"
    if match.resources and not _any_glob(match.resources, req.resource):
        return f"resource {req.resource or '(none)'} not in {match.resources}"
    if match.namespaces and not _any_glob(match.namespaces, req.namespace):
        return f"namespace {req.namespace or '(cluster)'} not in {match.namespaces}"
    if match.names and not any(_any_glob(match.names, name) for name in _names_of(req)):
        return f"name {req.name or '(none)'} not in {match.names}"
    if match.commands and not (req.command and _any_glob(match.commands, " ".join(req.command))):
        return f"command {' '.join(req.command) or '(none)'} not in {match.commands}"
    return None


def _matches(match: RuleMatch, req: Request) -> bool:
    """``_mismatch(match, req) is None`` without building the reasons (the request path's version; a test
    holds the two equal)."""
    who = req.identity
    if match.users and not _any_glob(match.users, who.user):
        return False
    if match.groups and not any(_any_glob(match.groups, g) for g in who.groups):
        return False
    if match.methods and not _any_glob(match.methods, who.method):
        return False
    for claim, pattern in match.claims.items():
        value = who.claims.get(claim)
        if value is None or not fnmatch.fnmatchcase(str(value), pattern):
            return False
    if match.verbs and "*" not in match.verbs and req.verb not in match.verbs:
        return False
    if match.api_groups and "*" not in match.api_groups and req.api_group not in match.api_groups:
        return False
    if match.resources and not _any_glob(match.resources, req.resource):
        return False
    if match.namespaces and not _any_glob(match.namespaces, req.namespace):
        return False
    if match.names and not any(_any_glob(match.names, name) for name in _names_of(req)):
        return False
    return not (match.commands and not (req.command and _any_glob(match.commands, " ".join(req.command))))


GLOB_CHARACTERS = frozenset("*?[")
MAX_INDEXED_PAIRS = 4096  # (verb, resource) pairs remembered; resources come from requests: bounded


class RuleIndex:
    """Which rules can match a (verb, resource) at all, in rule order: a rule that names verbs is a candidate
    only for those; a rule whose `resources` are all plain names only for those resources. Everything else
    about a rule is checked per request (`_matches`), so the index only skips rules that cannot match."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._by_verb: dict[str, frozenset[int]] = {}
        any_verb = {i for i, r in enumerate(rules) if not r.match.verbs or "*" in r.match.verbs}
        for verb in VERBS:
            self._by_verb[verb] = frozenset(
                any_verb | {i for i, r in enumerate(rules) if verb in r.match.verbs}
            )
        self._any_resource: set[int] = set()
        self._by_resource: dict[str, set[int]] = {}
        for i, rule in enumerate(rules):
            names = rule.match.resources
            if not names or any(GLOB_CHARACTERS & set(name) for name in names):
                self._any_resource.add(i)
            else:
                for name in names:
                    self._by_resource.setdefault(name, set()).add(i)
        self._all = tuple(range(len(rules)))
        self._candidates: dict[tuple[str, str], tuple[int, ...]] = {}
        # The rules with a condition on the request object (read once: a private attribute of a pydantic
        # model is a slow lookup on every request).
        self.reading_object = frozenset(i for i, rule in enumerate(rules) if rule.match._reads_object)
        self.reading_name = frozenset(i for i, rule in enumerate(rules) if rule.match._reads_name)
        self.has_condition = tuple(rule.match._program is not None for rule in rules)

    def candidates(self, verb: str, resource: str) -> tuple[int, ...]:
        key = (verb, resource)
        found = self._candidates.get(key)
        if found is not None:
            return found
        by_verb = self._by_verb.get(verb)
        if by_verb is None:  # not a verb rules can name: every rule is tried
            return self._all
        by_resource = self._any_resource | self._by_resource.get(resource, set())
        found = tuple(sorted(by_verb & by_resource))
        if len(self._candidates) >= MAX_INDEXED_PAIRS:
            self._candidates.clear()
        self._candidates[key] = found
        return found


BODY_VERBS = {"create": "POST", "update": "PUT", "patch": "PATCH"}


def request_body(req: Request) -> Body | None:
    """The document a condition's `object` is, decoded as the API server would (see kubegate.core.bodies):
    the object of a create or update, the patch document of a patch. None for requests that carry no object
    (reads, deletes, exec/attach/port-forward — `object` is null there, as in ValidatingAdmissionPolicy).
    Raises BodyError when the body cannot be read that way."""
    if req.verb not in BODY_VERBS or req.resource in CONNECT_SUBRESOURCES:
        return None
    if req._decoded is not None and req._decoded[0] is req.body:
        cached = req._decoded[1]
        if isinstance(cached, BodyError):
            raise cached
        return cached
    result: Body | BodyError
    try:
        if req.body is None:
            raise BodyError("the request body was not given")
        if len(req.body) > MAX_CONDITION_BODY_BYTES:
            raise BodyError(f"the request body is larger than {MAX_CONDITION_BODY_BYTES} bytes")
        result = decode_write_body(req.method or BODY_VERBS[req.verb], req.content_type, req.body)
    except BodyError as exc:
        result = exc
    req._decoded = (req.body, result)
    if isinstance(result, BodyError):
        raise result
    return result


def cel_activation(req: Request, body: Body | None = None) -> dict[str, Any]:
    """The CEL variables, named as in Kubernetes' ValidatingAdmissionPolicy where they exist there.
    `object` is `body`'s document (see `request_body`); `request.contentType` its media type and
    `request.patchType` its patch type (`json-patch`, `merge-patch`, `strategic-merge-patch`,
    `apply-patch`; "" for a whole object)."""
    who = req.identity
    name, namespace = req.name, req.namespace
    if _named_by_body(req) and body is not None and body.shape == "object":
        # handlers/create.go: a create's admission attributes carry the object's name (and a Namespace's
        # namespace is its name), where the path has none
        meta = body.doc.get("metadata") if isinstance(body.doc, dict) else None
        found = meta.get("name") if isinstance(meta, dict) else None
        name = found if isinstance(found, str) else ""
        if req.resource == "namespaces" and not req.api_group and not namespace:
            namespace = name
    return {
        "request": {
            "verb": req.verb,
            "resource": {
                "group": req.api_group,
                "version": req.api_version,
                "resource": req.resource.split("/")[0],
            },
            "subResource": req.resource.partition("/")[2],
            "namespace": namespace,
            "name": name,
            "path": req.path,
            "userInfo": {"username": who.user, "groups": list(who.groups), "uid": who.uid},
            "contentType": body.media_type if body else "",
            "patchType": body.shape if body and body.shape != "object" else "",
        },
        "identity": {
            "user": who.user,
            "groups": list(who.groups),
            "method": who.method,
            "issuer": who.issuer,
            "claims": who.claims,
        },
        "object": body.doc if body else None,
        "command": list(req.command),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0] if isinstance(exc, celpy.CELEvalError) and exc.args else exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _condition(match: RuleMatch, req: Request) -> tuple[bool | None, str, int]:
    """(True/False, why, 0) when the condition evaluated; (None, why not, HTTP status of a body error or
    0) when it could not be."""
    body: Body | None = None
    if match._reads_object or (match._reads_name and _named_by_body(req)):
        try:
            body = request_body(req)
        except BodyError as exc:
            return None, f"the request body could not be read: {exc}", exc.status
        if body is not None and body.shape == "json-patch" and not match._reads_patch_type:
            # `object` is a list of operations there: a condition written for objects would read it as
            # "nothing matches" (has() is false on a list), so it cannot judge it unless it says it can
            return None, "the body is a JSON patch and the condition does not look at request.patchType", 0
    try:
        result = match._program.evaluate(celpy.json_to_cel(cel_activation(req, body)))
    except Exception as exc:  # celpy raises evaluation errors as well as returning them
        return None, f"its condition could not be evaluated: {_first_line(exc)}", 0
    if isinstance(result, celpy.CELEvalError):
        return None, f"its condition could not be evaluated: {_first_line(result)}", 0
    if not isinstance(result, celpy.celtypes.BoolType):
        return None, f"its condition could not be evaluated: it gave {type(result).__name__}, not a bool", 0
    return bool(result), f"condition {'true' if result else 'false'}", 0


ACTION_RANK = {"allow": 0, "approve": 1, "deny": 2}


def creating(req: Request) -> Request | None:
    """The request read as the `create` it may be (see `Request.creates`); None when it is no more than its
    verb."""
    if not req.creates or req.verb == "create":
        return None
    # The body stays what it is (an apply patch, a whole object): read as the method sent it
    return replace(req, verb="create", method=req.method or BODY_VERBS.get(req.verb, ""))


def evaluate(settings: PolicySettings, req: Request, *, explain: bool = True) -> Outcome:
    """The rules against one request, in order. Pure (no I/O): the caller has read the body if needed.
    With `explain` (``kubegate policy check``) every rule is tried and the trace says why each did or did
    not match; without it (the request path) only the index's candidates are tried and there is no trace —
    the same outcome either way.

    A request that may create its object (`Request.creates`) is evaluated as `create` and as its own verb;
    the stricter outcome decides, the `create` reading's on a tie (see the module docstring)."""
    as_create = creating(req)
    if as_create is None:
        return _evaluate_one(settings, req, explain)
    created = _evaluate_one(settings, as_create, explain)
    req._decoded = as_create._decoded  # decoded once for both readings
    own = _evaluate_one(settings, req, explain)
    created.as_verb = "create"
    chosen = created if ACTION_RANK[created.action] >= ACTION_RANK[own.action] else own
    dry_run = created.dry_run + [entry for entry in own.dry_run if entry not in created.dry_run]
    trace: list[str] = []
    if explain:
        why = "an apply patch" if req.verb == "patch" else f"a PUT of {req.resource}"
        trace = [
            f"as create ({why} creates the object when it is missing):",
            *(f"  {line}" for line in created.trace),
            f"as {req.verb}:",
            *(f"  {line}" for line in own.trace),
            f"the stricter decides: {chosen.action} as {chosen.as_verb or req.verb}",
        ]
    return replace(chosen, dry_run=dry_run, trace=trace)


def _evaluate_one(settings: PolicySettings, req: Request, explain: bool) -> Outcome:
    if not explain:
        return _evaluate_fast(settings, req)
    dry: list[dict[str, str]] = []
    trace: list[str] = []
    for rule in settings.rules:
        why_not = _mismatch(rule.match, req)
        failure, failure_status = "", 0  # why the condition could not be evaluated, when the rule applies
        if why_not is None and rule.match._program is not None:
            matched, detail, status = _condition(rule.match, req)
            if matched is None and rule.matches_on_condition_error:
                failure, failure_status = detail, status  # fail closed: the rule applies
            elif not matched:
                why_not = detail
        if why_not is not None:
            trace.append(f"{rule.name}: no match ({why_not})")
            continue
        how = f"matched because {failure} (on_condition_error: match)" if failure else "matched"
        error = f"policy rule {rule.name}: {failure}" if failure else ""
        if rule.dry_run or settings.dry_run:
            trace.append(f"{rule.name}: {how}, dry run: would {rule.action}")
            dry.append({"rule": rule.name, "action": rule.action})
            continue
        trace.append(f"{rule.name}: {how} → {rule.action}")
        return Outcome(rule, rule.action, error or rule.message, dry, trace, error, failure_status)
    trace.append(f"no rule decided → default {settings.default}")
    return Outcome(None, settings.default, "", dry, trace)


def _evaluate_fast(settings: PolicySettings, req: Request) -> Outcome:
    """`evaluate` over the index's candidates, without a trace."""
    dry: list[dict[str, str]] = []
    rules = settings.rules
    index = settings.index
    for position in index.candidates(req.verb, req.resource):
        rule = rules[position]
        if not _matches(rule.match, req):
            continue
        failure, failure_status = "", 0
        if index.has_condition[position]:
            matched, detail, status = _condition(rule.match, req)
            if matched is None and rule.matches_on_condition_error:
                failure, failure_status = detail, status  # fail closed: the rule applies
            elif not matched:
                continue
        error = f"policy rule {rule.name}: {failure}" if failure else ""
        if rule.dry_run or settings.dry_run:
            dry.append({"rule": rule.name, "action": rule.action})
            continue
        return Outcome(rule, rule.action, error or rule.message, dry, [], error, failure_status)
    return Outcome(None, settings.default, "", dry, [])


def needs_body(settings: PolicySettings, req: Request) -> bool:
    """Whether some rule that could still decide has a condition on the request object (also as the
    `create` a request may be)."""
    index = settings.index
    reading = index.reading_object
    if not reading and not index.reading_name:
        return False
    rules = settings.rules
    readings = [req]
    as_create = creating(req)
    if as_create is not None:
        readings.append(as_create)
    return any(
        (i in reading or (i in index.reading_name and _named_by_body(each)))
        and _matches(rules[i].match, each)
        for each in readings
        for i in index.candidates(each.verb, each.resource)
    )


def _named_by_body(req: Request) -> bool:
    """A create without a name in its path: the API server takes the name from the object."""
    return req.verb == "create" and not req.name


CONNECT_SUBRESOURCES = {"pods/exec", "pods/attach", "pods/portforward"}


def api_verb(verb: str, resource: str) -> str:
    """The verb a rule sees. exec/attach/port-forward arrive as GET (WebSocket) or POST (SPDY) and the API
    server authorizes them as `create` on the subresource; so do rules, or "allow get" would allow exec."""
    return "create" if resource in CONNECT_SUBRESOURCES else verb


def request_from_attributes(
    identity: Identity, attrs: RequestAttributes, path: str, command: list[str], body: bytes | None
) -> Request:
    return Request(
        identity=identity,
        verb=api_verb(attrs.verb, attrs.resource_path),
        api_group=attrs.api_group,
        api_version=attrs.api_version,
        resource=attrs.resource_path,
        namespace=attrs.namespace,
        name=attrs.name,
        path=path,
        command=command,
        body=body,
    )


def request_from_flow(flow: Flow) -> Request:
    attrs = flow.attributes
    assert flow.identity is not None
    # The command exactly as the API server will decode it (every value, in order, blanks kept).
    command = list(attrs.command)
    req = request_from_attributes(flow.identity, attrs, flow.request.path, command, flow.request.body)
    req.method = flow.request.method.upper()
    content_types = flow.request.header_values("content-type")
    # Go's Header.Get reads the first Content-Type; two of them could be read either way: joined, they are
    # no media type at all and the body is refused
    req.content_type = ", ".join(content_types)
    return req


def decision_for(outcome: Outcome, connection: str) -> Decision:
    rule = outcome.rule
    if rule is None:
        if outcome.action == "deny":
            return Decision(
                Verdict.DENY, f"no policy rule allows this on connection {connection}", plugin=PLUGIN_NAME
            )
        return Decision(Verdict.ALLOW, plugin=PLUGIN_NAME)
    if outcome.action == "deny":
        reason = outcome.condition_error or rule.message or f"denied by policy rule {rule.name}"
        return Decision(Verdict.DENY, reason, rule.name, PLUGIN_NAME)
    if outcome.action == "approve":
        assert rule.approval is not None
        spec = ApprovalSpec(
            reviewer_groups=tuple(rule.approval.reviewer_groups),
            min_approvals=rule.approval.min_approvals,
            ttl_seconds=rule.approval.ttl_seconds,
            scope=rule.approval.scope,
            window_seconds=rule.approval.window_seconds or 0,
        )
        message = outcome.condition_error or rule.message or f"policy rule {rule.name} requires approval"
        if outcome.as_verb:  # reviewers see the verb patch or update: say what else it may do
            message += " (judged as a create too: this request creates the object when it is missing)"
        return Decision(Verdict.NEEDS_APPROVAL, message, rule.name, PLUGIN_NAME, approval=spec)
    return Decision(Verdict.ALLOW, rule.message, rule.name, PLUGIN_NAME)


# ---------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return PolicySettings


@hookimpl
def kubegate_audit_fields(flow: Flow) -> dict[str, Any]:
    """The audit event's `policy`: what dry-run rules would have done (None when none matched)."""
    return {"policy": flow.state.get(PLUGIN_NAME)}


@hookimpl
async def kubegate_decide(flow: Flow) -> Decision | None:
    settings: PolicySettings = flow.connection.settings_for(PLUGIN_NAME)
    req = request_from_flow(flow)
    if req.body is None and not flow.request.websocket and needs_body(settings, req):
        req.body = await flow.request.read_body()
    outcome = evaluate(settings, req, explain=False)
    if outcome.dry_run or outcome.as_verb:
        # The audit event's `policy`: what dry-run rules would have done, and `as_verb: create` when the
        # request was decided as the create it may be
        flow.state[PLUGIN_NAME] = {"dry_run": outcome.dry_run} | (
            {"as_verb": outcome.as_verb} if outcome.as_verb else {}
        )
        for entry in outcome.dry_run:
            log.info("policy dry run on %s: rule %s would %s %s %s for %s", flow.connection.name,
                     entry["rule"], entry["action"], req.verb, req.path, req.identity.user)  # fmt: skip
    decision = decision_for(outcome, flow.connection.name)
    if outcome.condition_error_status == 415 and decision.verdict is not Verdict.ALLOW:
        # A media type the gateway does not read (CBOR, an unknown patch type): answer as the API server
        # would for one it does not accept, so client-go retries a CBOR body as JSON, which is then judged.
        flow.decision = Decision(Verdict.DENY, decision.reason, decision.rule, PLUGIN_NAME)
        raise StatusError(415, decision.reason)
    return decision
