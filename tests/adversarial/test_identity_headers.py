"""An identity reaches the API server as the gateway checked it: Go's HTTP parser (net/textproto) drops
spaces and tabs around a header value, so a claim `" system:masters"` would be read as `system:masters`,
and a user claim `" "` as no `Impersonate-User` at all — the request then runs as the gateway's own
credential. A real gateway whose `oidc` issuer maps the e-mail and the IdP's groups as they are (no
prefixes, common in Kubernetes OIDC setups) in front of the sandbox, which parses headers as Go does; the
gateway's own APIs (`/api/approvals`) judge callers the same way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import gateway_api
from oidc_idp import IdP

AUDIENCE = "kubegate-identity-headers"
SECRETS = "/k8s/sandbox/api/v1/namespaces/prod/secrets"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    server = IdP(AUDIENCE)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(sandbox, idp: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-identity-headers")
    config = gateway_config(sandbox, directory, free_port())
    config["connections"]["sandbox"]["plugins"]["oidc"] = {
        "issuers": [
            {
                "issuer": idp.url,
                "audiences": [AUDIENCE],
                "claim_mappings": {"username": {"claim": "email", "prefix": ""}, "groups": {"prefix": ""}},
            }
        ]
    }
    config["connections"]["sandbox"]["plugins"]["approvals"] = {}
    g = start_gateway(directory, config)
    yield g
    stop_process(g.process)


def last_id(sandbox) -> int:
    items = sandbox.requests_log()
    return items[-1]["id"] if items else 0


@pytest.mark.parametrize("group", [" system:masters", "\tsystem:masters"])
def test_a_system_group_behind_spaces_is_refused_like_the_plain_one(gw, sandbox, idp, group):
    since = last_id(sandbox)
    status, answer = gateway_api(gw, "GET", SECRETS, idp.mint(email="mallory@example.com", groups=[group]))
    assert status == 401, answer
    assert "system:masters" in answer["message"] and "not allowed" in answer["message"]
    assert sandbox.requests_log(since) == []


@pytest.mark.parametrize(
    "email",
    [" ", "mallory@example.com ", " kubegate:gateway"],
    ids=["blank: no Impersonate-User, the gateway's own credential", "another name than audited", "reserved"],
)
def test_a_user_name_the_api_server_would_read_differently_is_refused(gw, sandbox, idp, email):
    since = last_id(sandbox)
    status, answer = gateway_api(gw, "GET", SECRETS, idp.mint(email=email, groups=["dev"]))
    assert status == 403, answer
    assert answer["kind"] == "Status" and "cannot be impersonated" in answer["message"]
    assert sandbox.requests_log(since) == []
    # The same person without the spaces is served, as that user.
    status, _ = gateway_api(gw, "GET", SECRETS, idp.mint(email="mallory@example.com", groups=["dev"]))
    assert status in (200, 403)  # RBAC's answer, not the gateway's
    assert [r["impersonate_user"] for r in sandbox.requests_log(since)] == ["mallory@example.com"]


def test_an_identity_the_data_path_refuses_cannot_use_the_gateways_apis_either(gw, idp):
    """`/api/approvals` acts without impersonation: `"mallory@example.com "` would be a user (and a person)
    of its own there, while the API server knows only `mallory@example.com`."""
    status, answer = gateway_api(
        gw, "GET", "/api/approvals", idp.mint(email="mallory@example.com ", groups=["dev"])
    )
    assert status == 401, answer
    status, answer = gateway_api(
        gw, "GET", "/api/approvals", idp.mint(email="mallory@example.com", groups=["dev"])
    )
    assert status == 200, answer
