"""Request attributes must match the API server's RequestInfoFactory, or policy and RBAC disagree."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.core.attributes import (
    RequestRefused,
    encode_query,
    go_bool,
    may_create,
    parse_query,
    parse_request,
    path_unescape,
    query_escape,
)

CASES = [
    # method, path, query, verb, group, version, namespace, resource, subresource, name
    ("GET", "/api/v1/namespaces/prod/pods", "", "list", "", "v1", "prod", "pods", "", ""),
    ("GET", "/api/v1/namespaces/prod/pods", "watch=true", "watch", "", "v1", "prod", "pods", "", ""),
    (
        "GET",
        "/api/v1/namespaces/prod/pods",
        "watch=1&resourceVersion=5",
        "watch",
        "",
        "v1",
        "prod",
        "pods",
        "",
        "",
    ),
    ("GET", "/api/v1/watch/namespaces/prod/pods", "", "watch", "", "v1", "prod", "pods", "", ""),
    ("GET", "/api/v1/namespaces/prod/pods/web", "", "get", "", "v1", "prod", "pods", "", "web"),
    ("HEAD", "/api/v1/namespaces/prod/pods/web", "", "get", "", "v1", "prod", "pods", "", "web"),
    (
        "GET",
        "/api/v1/namespaces/prod/pods/web/log",
        "follow=true",
        "get",
        "",
        "v1",
        "prod",
        "pods",
        "log",
        "web",
    ),
    (
        "POST",
        "/api/v1/namespaces/prod/pods/web/exec",
        "command=ls",
        "create",
        "",
        "v1",
        "prod",
        "pods",
        "exec",
        "web",
    ),
    (
        "GET",
        "/api/v1/namespaces/prod/pods/web/exec",
        "command=ls",
        "get",
        "",
        "v1",
        "prod",
        "pods",
        "exec",
        "web",
    ),
    ("POST", "/api/v1/namespaces/prod/pods", "", "create", "", "v1", "prod", "pods", "", ""),
    ("PUT", "/api/v1/namespaces/prod/pods/web", "", "update", "", "v1", "prod", "pods", "", "web"),
    (
        "PATCH",
        "/apis/apps/v1/namespaces/prod/deployments/web",
        "",
        "patch",
        "apps",
        "v1",
        "prod",
        "deployments",
        "",
        "web",
    ),
    (
        "PATCH",
        "/apis/apps/v1/namespaces/prod/deployments/web/scale",
        "",
        "patch",
        "apps",
        "v1",
        "prod",
        "deployments",
        "scale",
        "web",
    ),
    ("DELETE", "/api/v1/namespaces/prod/pods/web", "", "delete", "", "v1", "prod", "pods", "", "web"),
    ("DELETE", "/api/v1/namespaces/prod/pods", "", "deletecollection", "", "v1", "prod", "pods", "", ""),
    ("GET", "/api/v1/namespaces", "", "list", "", "v1", "", "namespaces", "", ""),
    ("GET", "/api/v1/namespaces/prod", "", "get", "", "v1", "prod", "namespaces", "", "prod"),
    (
        "PUT",
        "/api/v1/namespaces/prod/finalize",
        "",
        "update",
        "",
        "v1",
        "prod",
        "namespaces",
        "finalize",
        "prod",
    ),
    ("GET", "/api/v1/namespaces/prod/status", "", "get", "", "v1", "prod", "namespaces", "status", "prod"),
    ("GET", "/api/v1/nodes", "", "list", "", "v1", "", "nodes", "", ""),
    (
        "GET",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "",
        "list",
        "rbac.authorization.k8s.io",
        "v1",
        "",
        "clusterroles",
        "",
        "",
    ),
    (
        "GET",
        "/api/v1/namespaces/prod/pods",
        "fieldSelector=metadata.name%3Dweb",
        "list",
        "",
        "v1",
        "prod",
        "pods",
        "",
        "web",
    ),
    (
        "GET",
        "/api/v1/namespaces/prod/pods",
        "fieldSelector=metadata.name%3Dweb&watch=true",
        "watch",
        "",
        "v1",
        "prod",
        "pods",
        "",
        "web",
    ),
    (
        "GET",
        "/api/v1/namespaces/prod/services/web:80/proxy/healthz",
        "",
        "get",
        "",
        "v1",
        "prod",
        "services",
        "proxy",
        "web:80",
    ),
    ("GET", "/api/v1/proxy/namespaces/prod/pods/web", "", "proxy", "", "v1", "prod", "pods", "", "web"),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "verb", "group", "version", "ns", "resource", "sub", "name"), CASES
)
def test_resource_requests(method, path, query, verb, group, version, ns, resource, sub, name):
    attrs = parse_request(method, path, query)
    assert attrs.is_resource_request
    got = (
        attrs.verb,
        attrs.api_group,
        attrs.api_version,
        attrs.namespace,
        attrs.resource,
        attrs.subresource,
        attrs.name,
    )
    assert got == (verb, group, version, ns, resource, sub, name)


@pytest.mark.parametrize(
    "path",
    ["/version", "/api", "/api/v1", "/apis", "/apis/apps", "/apis/apps/v1", "/openapi/v3", "/healthz", "/"],
)
def test_non_resource_requests(path):
    attrs = parse_request("GET", path, "")
    assert not attrs.is_resource_request
    assert attrs.verb == "get"
    assert attrs.resource == ""


def test_resource_path_names_subresource():
    assert parse_request("GET", "/api/v1/namespaces/p/pods/w/exec", "").resource_path == "pods/exec"
    assert parse_request("GET", "/api/v1/namespaces/p/pods/w/portforward", "").is_streaming_subresource


def test_watch_without_target_is_an_error():
    with pytest.raises(ValueError):
        parse_request("GET", "/api/v1/watch", "")


# ---------------------------------------------------------------------------------------------------------
# Go rules, one by one (core/attributes.py names the Go function of each)
# ---------------------------------------------------------------------------------------------------------

PODS = "/api/v1/namespaces/prod/pods"
EXEC = "/api/v1/namespaces/prod/pods/web/exec"


def refused(method: str, path: str, query: str) -> int:
    with pytest.raises(RequestRefused) as info:
        parse_request(method, path, query)
    return info.value.code


@pytest.mark.parametrize(
    ("query", "verb"),
    [
        ("watch=true", "watch"),
        ("watch=1", "watch"),
        ("watch=", "watch"),  # Convert_Slice_string_To_bool: an empty value is true (the issue said false)
        ("watch", "watch"),  # no `=`: an empty value
        ("watch=yes", "watch"),  # anything but 0/false
        ("watch=FaLsE", "list"),
        ("watch=0", "list"),
        ("watch=false", "list"),
        ("", "list"),
        ("wat%63h=1", "watch"),  # keys are unescaped too
        ("watch=%74rue", "watch"),
    ],
)
def test_watch_is_go_bool_of_the_first_value(query, verb):
    assert parse_request("GET", PODS, query).verb == verb


@pytest.mark.parametrize(
    "query",
    [
        "watch=1&watch=0",  # Go reads the first, Python's parse_qs the last: refused, not guessed
        "watch=0&wat%63h=1",
        "limit=1&limit=2",
        "fieldSelector=metadata.name%3Da&fieldSelector=metadata.name%3Db",
        "watch=1;x=1",  # Go drops a pair holding `;`
        "command=rm&command=;x",
        "a=%zz",  # invalid escapes: Go drops the pair
        "a=%4",
        "a%=1",
        "a=%",
        "a=%C3",  # not UTF-8 once unescaped
        "&".join(["a=1"] * 10001),  # Go parses nothing beyond 10000 pairs
        "watch=fal%C5%BFe",  # EqualFold says false, the fallback ToLower says true
        "limit=abc",
        "timeoutSeconds=1.5",
        "labelSelector=app%3Dx&fieldSelector=metadata.name%3Dweb",
    ],
)
def test_ambiguous_queries_are_refused(query):
    assert refused("GET", PODS, query) == 400


@pytest.mark.parametrize("method", ["post", "Get", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"])
def test_methods_the_api_server_does_not_serve_are_refused(method):
    assert refused(method, PODS, "") == 405
    assert refused(method, "/version", "") == 405


def test_list_parameters_keep_every_value_in_order_blanks_included():
    attrs = parse_request("GET", EXEC, "command=sh&command=&command=-c&command=a+b%26c&stdout=1&tty=")
    assert attrs.command == ["sh", "", "-c", "a b&c"]
    assert attrs.stdout and attrs.tty and not attrs.stdin and not attrs.stderr
    post = parse_request("POST", EXEC, "command=ls&container=app&stdin=false&stderr=0")
    assert post.command == ["ls"] and post.container == "app" and not post.stdin and not post.stderr
    dry = parse_request("POST", PODS, "dryRun=All&dryRun=All")
    assert dry.query["dryRun"] == ["All", "All"]


def test_attach_portforward_and_log_options_are_typed():
    attach = parse_request("GET", "/api/v1/namespaces/prod/pods/web/attach", "command=x&stdin=1&container=c")
    assert attach.command == [] and attach.stdin and attach.container == "c"
    forward = parse_request("GET", "/api/v1/namespaces/prod/pods/web/portforward", "ports=80,8080&ports=9")
    assert forward.ports == [80, 8080, 9]
    assert refused("GET", "/api/v1/namespaces/prod/pods/web/portforward", "ports=80,x") == 400
    assert refused("GET", "/api/v1/namespaces/prod/pods/web/portforward", "ports=70000") == 400
    logs = parse_request("GET", "/api/v1/namespaces/prod/pods/web/log", "follow=&container=c&tailLines=%2B5")
    assert logs.follow and logs.container == "c" and logs.tail_lines == 5 and logs.limit_bytes is None
    assert refused("GET", "/api/v1/namespaces/prod/pods/web/log", "sinceSeconds=1e3") == 400


@pytest.mark.parametrize(
    ("selector", "name"),
    [
        ("metadata.name=web", "web"),
        ("metadata.name==web", "web"),
        ("metadata.name!=web", ""),
        ("metadata.name=web,status.phase=Running", "web"),
        ("metadata.name=zzz,metadata.name=web", "web"),  # terms are sorted: the first sorted term wins
        ("metadata.name=a\\,b", "a,b"),  # `\,` is an escaped comma, part of the value
        ("metadata.name=a\\=b", "a=b"),
        ("metadata.name=a\\\\b", "a\\b"),
        ("metadata.name=a\\b", ""),  # invalid escape: the selector does not parse, no name
        ("metadata.name=a=b", ""),  # a bare `=` in a value does not parse
        ("metadata.name=web\\", ""),
        (" metadata.name=web", ""),  # no trimming: the field is ` metadata.name`
        ("metadata.name=web ", "web "),
        ("metadata.name=..", ""),  # not a valid path segment name
        ("metadata.name=a%2Fb", ""),
        ("metadata.name=", ""),
        ("status.phase=Running", ""),
    ],
)
def test_field_selector_names_the_object_as_the_api_server_does(selector, name):
    attrs = parse_request("GET", PODS, "fieldSelector=" + query_escape(selector))
    assert (attrs.verb, attrs.name) == ("list", name)


def test_proxy_queries_pass_on_raw_and_unread():
    raw = "a=1&a=2&b=;x&c=%zz&watch=1&watch=0"
    for path in ("/api/v1/namespaces/prod/pods/web/proxy/x", "/api/v1/proxy/namespaces/prod/pods/web"):
        attrs = parse_request("GET", path, raw)
        assert attrs.is_proxy and attrs.canonical_query == raw and attrs.query == {}


def test_non_resource_requests_refuse_unreadable_queries_but_not_repeats():
    assert parse_request("GET", "/openapi/v3", "a=1&a=2").canonical_query == "a=1&a=2"
    assert refused("GET", "/version", "a=;") == 400


def test_canonical_query_is_go_values_encode():
    attrs = parse_request("GET", PODS, "watch&limit=5&labelSelector=app%3Dweb,tier+in+(a)&b=%7e%41-_.")
    assert attrs.canonical_query == "b=~A-_.&labelSelector=app%3Dweb%2Ctier+in+%28a%29&limit=5&watch="
    assert go_bool(["FALSE"]) is False and go_bool(["fal\u017fe"]) is False and go_bool([""]) is True


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [("/api/v1/namespaces/a%2Bb/pods", "/api/v1/namespaces/a+b/pods"), ("/x+y/%C3%A9", "/x+y/é")],
)
def test_path_unescape_is_go_path_unescape(raw, decoded):
    assert path_unescape(raw) == decoded


@pytest.mark.parametrize("raw", ["/api/v1/namespaces/%zz", "/api/%4", "/api/%", "/api/%C3%28"])
def test_unreadable_paths_are_refused(raw):
    with pytest.raises(RequestRefused) as info:
        path_unescape(raw)
    assert info.value.code == 400


QUERY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(QUERY_TEXT.filter(bool), st.lists(QUERY_TEXT, min_size=1, max_size=3), max_size=6))
def test_canonical_encoding_round_trips(values):
    """parse(canonical(values)) == values: what the gateway forwards reads back as what it decided on."""
    encoded = encode_query(values)
    assert encoded.isascii() and ";" not in encoded and "#" not in encoded
    assert parse_query(encoded) == values
    assert encode_query(parse_query(encoded)) == encoded


@pytest.mark.parametrize(("path", "key"), [(EXEC, "tty"), (EXEC, "stdin"), (PODS + "/web/log", "follow")])
def test_booleans_the_two_go_decoders_disagree_on_are_refused(path, key):
    """EqualFold folds U+017F to `s`, ToLower (the fallback, and older API servers) does not."""
    assert refused("GET", path, f"{key}=fal%C5%BFe") == 400
    assert getattr(parse_request("GET", path, f"{key}=FALSE"), key) is False


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/nodes/n1/proxy/exec/prod/web/app",
        "/api/v1/nodes/n1/proxy/Exec/prod/web/app",
        "/api/v1/nodes/n1/proxy/attach/prod/web/app",
        "/api/v1/nodes/n1/proxy/portForward/prod/web",
        "/api/v1/nodes/n1/proxy/run/prod/web/app",
        "/api/v1/nodes/n1/proxy/checkpoint/prod/web/app",
        "/api/v1/nodes/n1:10250/proxy/exec/prod/web/app",
        "/api/v1/proxy/nodes/n1/exec/prod/web/app",
    ],
)
def test_the_kubelets_sessions_through_nodes_proxy_are_refused(path):
    with pytest.raises(RequestRefused) as refused:
        parse_request("GET", path, "command=sh")
    assert refused.value.code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/nodes/n1/proxy/metrics",
        "/api/v1/nodes/n1/proxy/containerLogs/prod/web/app",  # logs: masked as a node's content
        "/api/v1/nodes/n1/proxy",
        "/api/v1/nodes/exec/proxy/stats",  # a node named exec
        "/api/v1/namespaces/prod/pods/web/proxy/exec/x",  # a pod's own HTTP path
        "/api/v1/namespaces/prod/services/exec/proxy/run",
        "/apis/example.com/v1/nodes/n1/proxy/exec/a/b/c",  # not the core group's nodes
    ],
)
def test_other_proxy_paths_are_not(path):
    assert parse_request("GET", path, "").is_proxy


# -- writes that may create their object (handlers/patch.go forceAllowCreate, update.go AllowCreateOnUpdate) --


@pytest.mark.parametrize(
    ("method", "path", "content_types", "creates"),
    [
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/apply-patch+yaml"], True),
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/apply-patch+yaml; charset=utf-8"], True),
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/apply-patch+cbor"], True),
        # two Content-Types: Go reads the first; any apply type among them counts (fail closed)
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/merge-patch+json", "application/apply-patch+yaml"],
         True),
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/merge-patch+json"], False),
        ("PATCH", "/api/v1/namespaces/dev/pods/p", ["application/strategic-merge-patch+json"], False),
        ("PATCH", "/api/v1/namespaces/dev/pods/p/proxy/x", ["application/apply-patch+yaml"], False),
        ("PUT", "/apis/rbac.authorization.k8s.io/v1/namespaces/dev/rolebindings/b", [], True),
        ("PUT", "/apis/rbac.authorization.k8s.io/v1/clusterroles/r", [], True),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/dev/leases/l", [], True),
        ("PUT", "/api/v1/namespaces/dev/services/s", [], True),
        ("PUT", "/api/v1/namespaces/dev/endpoints/s", [], True),
        ("PUT", "/apis/example.com/v1/namespaces/dev/widgets/w", [], True),  # a CRD or an aggregated API
        ("PUT", "/api/v1/namespaces/dev/pods/p", [], False),
        ("PUT", "/apis/apps/v1/namespaces/dev/deployments/d", [], False),
        ("PUT", "/apis/apps/v1/namespaces/dev/deployments/d/scale", [], False),
        ("PUT", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/w", [], False),
        ("POST", "/api/v1/namespaces/dev/pods", [], False),  # a create is a create already
        ("GET", "/api/v1/namespaces/dev/services/s", [], False),
    ],
)  # fmt: skip
def test_may_create(method, path, content_types, creates):
    assert may_create(parse_request(method, path, ""), content_types) is creates
