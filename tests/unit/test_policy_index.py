"""The request path's policy evaluation (rule index + `_matches`, no trace) decides exactly as the explained
evaluation `kubegate policy check` uses (every rule, `_mismatch`, with a trace): for generated policies and
requests, including globs, dry runs, conditions and verbs or resources no rule names."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubegate.core.flow import Identity
from kubegate.plugins.policy import (
    MAX_INDEXED_PAIRS,
    PolicySettings,
    Request,
    _matches,
    _mismatch,
    creating,
    evaluate,
    needs_body,
)

USERS = ["alice", "bob", "ci-bot", "system:serviceaccount:ci:deployer"]
GROUPS = ["developers", "ci", "reviewers", "system:authenticated"]
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
RESOURCES = ["pods", "pods/exec", "pods/log", "secrets", "deployments", "deployments/scale", "nodes", ""]
NAMESPACES = ["prod", "staging", "kube-system", ""]

resource_patterns = st.sampled_from([*RESOURCES[:-1], "pods/*", "*", "deploy*", "secret?", "[np]o*"])
rule_match = st.fixed_dictionaries(
    {},
    optional={
        "users": st.lists(st.sampled_from([*USERS, "ci-*", "*"]), max_size=2),
        "groups": st.lists(st.sampled_from([*GROUPS, "dev*"]), max_size=2),
        "verbs": st.lists(st.sampled_from([*VERBS, "*"]), max_size=3),
        "resources": st.lists(resource_patterns, max_size=3),
        "namespaces": st.lists(st.sampled_from([*NAMESPACES[:-1], "prod*", "*"]), max_size=2),
        "names": st.lists(st.sampled_from(["web", "db-*", "*"]), max_size=2),
        "condition": st.sampled_from(
            [
                'request.name == "web"',
                "object.spec.replicas > 3",
                "request.patchType == 'json-patch'",
                "1/0 == 1",
            ]
        ),
    },
)


@st.composite
def policies(draw: st.DrawFn) -> PolicySettings:
    rules = []
    for i in range(draw(st.integers(0, 12))):
        action = draw(st.sampled_from(["allow", "deny", "approve"]))
        rule = {"name": f"r{i}", "action": action, "match": draw(rule_match), "message": f"m{i}"}
        if action == "approve":
            rule["approval"] = {"reviewer_groups": ["reviewers"]}
        if draw(st.booleans()) and draw(st.booleans()):
            rule["dry_run"] = True
        rules.append(rule)
    default = draw(st.sampled_from(["allow", "deny"]))
    all_dry_run = draw(st.integers(0, 9)) == 0  # now and then the whole policy only records
    return PolicySettings.model_validate({"default": default, "dry_run": all_dry_run, "rules": rules})


@st.composite
def requests(draw: st.DrawFn) -> Request:
    identity = Identity(
        user=draw(st.sampled_from(USERS)), groups=tuple(draw(st.lists(st.sampled_from(GROUPS))))
    )
    verb = draw(st.sampled_from([*VERBS, "proxy"]))  # a verb no rule can name: every rule is tried
    body = draw(st.sampled_from([None, b'{"spec": {"replicas": 5}}', b"not json", b'[{"op": "remove"}]']))
    return Request(
        identity=identity,
        verb=verb,
        resource=draw(st.sampled_from([*RESOURCES, "widgets", "pods/portforward"])),
        namespace=draw(st.sampled_from(NAMESPACES)),
        name=draw(st.sampled_from(["web", "db-0", ""])),
        body=body,
        # an apply patch (of a patch) or a PUT of a resource created on update is read as a create too
        content_type="application/json-patch+json"
        if body and body.startswith(b"[")
        else draw(st.sampled_from(["application/json", "application/apply-patch+yaml"])),
    )


def outcome_of(o):
    return (o.rule.name if o.rule else None, o.action, o.reason, o.dry_run, o.condition_error,
            o.condition_error_status, o.as_verb)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), request=requests())
def test_the_indexed_evaluation_decides_as_the_explained_one(policy: PolicySettings, request: Request):
    explained = evaluate(policy, request)
    fast = evaluate(policy, request, explain=False)
    assert outcome_of(fast) == outcome_of(explained), explained.trace
    assert fast.trace == []
    readings = [request] + ([creating(request)] if creating(request) else [])
    reads = any(
        (r.match._reads_object or (r.match._reads_name and each.verb == "create" and not each.name))
        and _mismatch(r.match, each) is None
        for r in policy.rules
        for each in readings
    )
    assert needs_body(policy, request) == reads


@settings(max_examples=400, deadline=None)
@given(policy=policies(), request=requests())
def test_matches_is_mismatch_without_the_reasons(policy: PolicySettings, request: Request):
    for rule in policy.rules:
        assert _matches(rule.match, request) == (_mismatch(rule.match, request) is None)


def test_the_index_skips_rules_that_cannot_match_and_keeps_order():
    policy = PolicySettings.model_validate({"rules": [
        {"name": "exec", "action": "deny", "match": {"resources": ["pods/exec"]}},
        {"name": "deletes", "action": "deny", "match": {"verbs": ["delete"]}},
        {"name": "any-pod-sub", "action": "deny", "match": {"resources": ["pods/*"], "verbs": ["create"]}},
        {"name": "everything", "action": "allow"},
    ]})  # fmt: skip
    names = lambda verb, resource: [policy.rules[i].name for i in policy.index.candidates(verb, resource)]  # noqa: E731
    assert names("get", "pods") == ["everything"]
    assert names("create", "pods/exec") == ["exec", "any-pod-sub", "everything"]
    assert names("delete", "pods") == ["deletes", "everything"]
    assert names("proxy", "pods") == ["exec", "deletes", "any-pod-sub", "everything"]  # unknown verb: all


def test_the_candidate_cache_stays_bounded_under_made_up_resources():
    policy = PolicySettings.model_validate(
        {"rules": [{"name": "r", "action": "deny", "match": {"verbs": ["get"]}}]}
    )
    for i in range(MAX_INDEXED_PAIRS * 2 + 10):
        policy.index.candidates("get", f"made-up-{i}")
    assert len(policy.index._candidates) <= MAX_INDEXED_PAIRS
