"""The MCP tools' arguments become API paths that name exactly one object (plugins/mcp/paths.py), and the
stated intent a request carries is read bounded and decoded (core/flow.py `stated_intent`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubegate.core.attributes import parse_request, path_unescape
from kubegate.core.errors import StatusError
from kubegate.core.flow import MAX_INTENT_CHARS, Request, stated_intent
from kubegate.plugins.mcp import paths


def test_known_resources_and_short_names():
    assert paths.target("pods").path("prod", "web") == "/api/v1/namespaces/prod/pods/web"
    assert (
        paths.target("deploy").path("prod", "web", "scale")
        == "/apis/apps/v1/namespaces/prod/deployments/web/scale"
    )
    assert paths.target("deployments.apps").collection_path(None) == "/apis/apps/v1/deployments"
    assert paths.target("nodes").path(None, "n1") == "/api/v1/nodes/n1"
    assert (
        paths.target("widgets", "example.com/v1").path("prod", "w")
        == "/apis/example.com/v1/namespaces/prod/widgets/w"
    )


@pytest.mark.parametrize(
    ("resource", "api_version", "namespace", "name"),
    [
        ("pods", None, "prod", "../../secrets"),
        ("pods", None, "prod", ".."),
        ("pods", None, "prod", "."),
        ("pods", None, "prod", "web/exec"),
        ("pods", None, "prod", "web%2f.."),
        ("pods", None, "prod", "web x"),
        ("pods", None, "prod", ""),
        ("pods", None, "prod/secrets", "web"),
        ("pods", None, "../kube-system", "web"),
        ("pods", None, "", "web"),  # namespaced: a namespace is required
        ("nodes", None, "prod", "n1"),  # cluster-scoped: no namespace
        ("pods/exec", None, "prod", "web"),
        ("secrets", "v1/../../x", "prod", "s"),
        ("widgets", None, "prod", "w"),  # unknown without api_version
        ("deployments.batch", None, "prod", "web"),  # a known plural in another group
    ],
)
def test_arguments_that_could_name_something_else_are_refused(resource, api_version, namespace, name):
    with pytest.raises(paths.ArgumentError):
        paths.target(resource, api_version).path(namespace, name)


@given(st.text(min_size=1, max_size=40))
def test_any_accepted_name_is_one_path_segment_the_api_server_reads_back_as_that_name(name):
    try:
        path = paths.target("pods").path("prod", name)
    except paths.ArgumentError:
        return
    attributes = parse_request("GET", path_unescape(path), "")
    assert (attributes.namespace, attributes.resource, attributes.name, attributes.subresource) == (
        "prod", "pods", name, "")  # fmt: skip


def test_manifest_kinds():
    assert paths.target_of_manifest("apps/v1", "Deployment", None).resource == "deployments"
    assert paths.target_of_manifest("example.com/v1", "Widget", "widgets").resource == "widgets"
    with pytest.raises(paths.ArgumentError):
        paths.target_of_manifest("example.com/v1", "Widget", None)
    with pytest.raises(paths.ArgumentError):
        paths.target_of_manifest("../v1", "Pod", None)


def request(*values: str) -> Request:
    return Request(method="GET", path="/", query="", headers=[("Kubegate-Intent", v) for v in values])


def test_stated_intent_is_decoded_and_bounded():
    assert stated_intent(request()) == ""
    assert stated_intent(request("restart the web tier")) == "restart the web tier"
    assert stated_intent(request("d%C3%A9ploiement%20urgent")) == "déploiement urgent"
    assert stated_intent(request("line one%0Aforged: line")) == "line one forged: line"
    assert stated_intent(request("x" * MAX_INTENT_CHARS)) == "x" * MAX_INTENT_CHARS
    for refused in (request("x" * (MAX_INTENT_CHARS + 1)), request("%78" * (MAX_INTENT_CHARS + 1)),
                    request("a", "b"), request("%FF%FE")):  # fmt: skip
        with pytest.raises(StatusError) as caught:
            stated_intent(refused)
        assert caught.value.code == 400
