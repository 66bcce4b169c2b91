"""Request attributes must match the API server's RequestInfoFactory, or policy and RBAC disagree."""

import pytest

from kubegate.core.attributes import parse_request

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
