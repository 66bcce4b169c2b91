"""Paths never escape their connection; identity headers are the gateway's alone."""

import pytest

from kubegate.core.errors import StatusError
from kubegate.core.flow import Identity
from kubegate.core.headers import check_upstream_headers, client_headers_for_upstream, impersonation_headers
from kubegate.core.proxy import split_path


@pytest.mark.parametrize(
    ("raw", "name", "path"),
    [
        (b"/k8s/prod/api/v1/pods", "prod", "/api/v1/pods"),
        (b"/k8s/prod/apis/", "prod", "/apis/"),
        (b"/k8s/prod", "prod", "/"),
        (b"/k8s/prod/", "prod", "/"),
        (
            b"/k8s/prod/api/v1/namespaces/p/services/web:80/proxy",
            "prod",
            "/api/v1/namespaces/p/services/web:80/proxy",
        ),
    ],
)
def test_split_path(raw, name, path):
    assert split_path(raw) == (name, path)


@pytest.mark.parametrize(
    "raw",
    [
        b"/k8s/prod/../other/api",
        b"/k8s/prod/api/../../other",
        b"/k8s/prod/./api",
        b"/k8s/prod//api/v1",
        b"/k8s/prod/api/v1//pods",
        b"/k8s/prod%2F..%2Fother/api",
        b"/k8s/prod/api%2fv1",
        b"/k8s/prod/%2e%2e/other",
        b"/k8s/prod/%2E./other",
        b"/k8s/prod/api\\..\\other",
        b"/k8s/prod/%252e%252e/other",
        b"/k8s/prod/api%00",
    ],
)
def test_escapes_are_refused(raw):
    with pytest.raises(StatusError) as info:
        split_path(raw)
    assert info.value.code == 400


def test_no_connection_name():
    with pytest.raises(StatusError) as info:
        split_path(b"/k8s/")
    assert info.value.code == 404


def test_client_credentials_and_impersonation_are_stripped():
    headers = [
        ("Authorization", "Bearer caller"),
        ("authorization", "Basic eHg6eXk="),
        ("Impersonate-User", "admin"),
        ("impersonate-group", "system:masters"),
        ("IMPERSONATE-UID", "0"),
        ("Impersonate-Extra-Scopes", "all"),
        ("Proxy-Authorization", "x"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Accept", "application/json"),
        ("Kubectl-Command", "kubectl get"),
        ("Kubegate-Intent", "rotating the db password hunter2"),  # for the gateway: shown, recorded masked
        ("KUBEGATE-INTENT", "x"),
    ]
    assert client_headers_for_upstream(headers) == [
        ("Accept", "application/json"),
        ("Kubectl-Command", "kubectl get"),
    ]


def test_impersonation_headers():
    identity = Identity(user="alice", groups=("dev", "ops"), uid="u-1", extra={"Scopes": ("a b", "c")})
    assert impersonation_headers(identity) == [
        ("Impersonate-User", "alice"),
        ("Impersonate-Group", "dev"),
        ("Impersonate-Group", "ops"),
        ("Impersonate-Uid", "u-1"),
        ("Impersonate-Extra-scopes", "a b"),
        ("Impersonate-Extra-scopes", "c"),
    ]


def test_identity_with_control_characters_is_refused():
    with pytest.raises(StatusError) as info:
        impersonation_headers(Identity(user="alice\r\nImpersonate-Group: system:masters"))
    assert info.value.code == 403


@pytest.mark.parametrize(
    "identity",
    [
        Identity(user="al\ud800ice"),  # a token's claim with a JSON "\ud800" escape
        Identity(user="alice", groups=("dev", "o\udfffps")),
        Identity(user="alice", uid="u-\ud83d"),
        Identity(user="alice", extra={"scopes": ("a", "b\udc00")}),
        Identity(user="alice", extra={"sc\ud800opes": ("a",)}),
        Identity(user="alice", groups=("dev\x7f",)),
    ],
)
def test_identity_that_has_no_header_form_is_refused_not_a_crash(identity):
    """Unpaired surrogates cannot be written as UTF-8: a 403 with the reason, not an encoding error on the
    way upstream (and control characters, as before)."""
    with pytest.raises(StatusError) as info:
        impersonation_headers(identity)
    assert info.value.code == 403 and "cannot be impersonated" in info.value.message
    assert impersonation_headers(Identity(user="José", groups=("开发",)))[1] == ("Impersonate-Group", "开发")


@pytest.mark.parametrize("user", ["kubegate:gateway", "kubegate:anything"])
def test_the_gateways_own_user_name_is_reserved(user):
    # An agent connection's gateway-own requests act as kubegate:gateway (RBAC may let it read Secrets):
    # a caller whose identity plugin maps them to that name must not inherit it.
    with pytest.raises(StatusError) as info:
        impersonation_headers(Identity(user=user))
    assert info.value.code == 403
    assert impersonation_headers(Identity(user="kubegate-fan"))[0] == ("Impersonate-User", "kubegate-fan")


@pytest.mark.parametrize(
    "identity",
    [
        Identity(user="alice", groups=(" system:masters",)),  # Go reads the group system:masters
        Identity(user="alice", groups=("system:masters ",)),
        Identity(user=" kubegate:gateway"),  # Go reads the gateway's own user
        Identity(user="alice "),  # policy, people and audit would see another name than RBAC
        Identity(user=" "),  # Go reads no user at all: the gateway's own credential would act
        Identity(user="alice", uid=" u-1"),
        Identity(user="alice", extra={"scopes": ("a", "b ")}),
    ],
    ids=["group-lead", "group-trail", "reserved-user", "user-trail", "user-blank", "uid", "extra-value"],
)
def test_a_name_the_api_server_would_read_without_its_spaces_is_refused(identity):
    """Go's net/textproto drops spaces and tabs around a header value: the API server would act as
    another identity than the one the gateway checked, decided on and audited."""
    with pytest.raises(StatusError) as info:
        impersonation_headers(identity)
    assert info.value.code == 403
    assert "space" in info.value.message or "reserved" in info.value.message
    # Spaces inside a name reach the API server as they are.
    assert impersonation_headers(Identity(user="Alice Smith", groups=("a b",)))[:2] == [
        ("Impersonate-User", "Alice Smith"),
        ("Impersonate-Group", "a b"),
    ]


def test_an_empty_user_name_is_refused_not_sent_as_no_impersonation():
    # buildImpersonationRequests impersonates only a non-empty Impersonate-User: an empty one would run
    # the request as the gateway's own credential.
    with pytest.raises(StatusError) as info:
        impersonation_headers(Identity(user="", groups=("dev",)))
    assert info.value.code == 403 and "empty user name" in info.value.message


def test_last_check_refuses_surviving_client_headers():
    credential = [("Authorization", "Bearer gateway")]
    imp = [("Impersonate-User", "alice")]
    check_upstream_headers([("Accept", "*/*"), *credential, *imp], credential, imp)
    for extra in [
        ("authorization", "Bearer caller"),
        ("Impersonate-Group", "system:masters"),
        ("IMPERSONATE-USER", "root"),
    ]:
        with pytest.raises(StatusError) as info:
            check_upstream_headers([*credential, *imp, extra], credential, imp)
        assert info.value.code == 500
    with pytest.raises(StatusError):
        check_upstream_headers(list(credential), credential, imp)  # impersonation removed by a plugin


class CountedHeaders(list):
    """A request's header list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        CountedHeaders.walks += 1
        return super().__iter__()


def test_a_requests_headers_are_walked_once_however_many_lookups():
    # A 1 MiB head of 86,000 one-letter headers (the API server takes it) was scanned whole for each of the
    # ~30 lookups a request makes: 60-100 ms of the event loop per unauthenticated request (red team).
    from kubegate.core.flow import Request

    headers = CountedHeaders([(f"X-{i}", "a") for i in range(86_000)])
    headers += [("authorization", "Bearer one"), ("User-Agent", "kubectl"), ("X-7", "again")]
    request = Request(method="GET", path="/api", query="", headers=headers)
    CountedHeaders.walks = 0
    for _ in range(30):
        assert request.header("USER-AGENT") == "kubectl"
        assert request.header_values("x-7") == ["a", "again"]
        assert request.bearer_token == "one"
        assert request.header("absent", "none") == "none"
    assert CountedHeaders.walks == 1
    request.header_values("x-7").append("changed")  # a copy: the request's own values stay
    assert request.header_values("x-7") == ["a", "again"]
