"""`kubegate login` end to end: a real OIDC provider process (oidc-provider-mock, authorization code flow)
and a SAML IdP built with python3-saml; the browser half driven over HTTP as a browser would (following
redirects, posting forms); kubectl then authenticates through `kubegate credential`, its exec plugin."""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import os
import re
import secrets
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from browserless import Browser, browser_login, mock_idp_authorize, read_login_prompt
from conftest import VENV_BIN, Gateway, free_port, gateway_config, start_gateway, stop_process
from kubetest import run_kubectl, wait_for
from saml_idp import SAMLIdP, make_signing_pair

KUBEGATE = str(VENV_BIN / "kubegate")
CLIENT_ID = "kubegate"
CI_CLIENT_ID = "ci-audience"


class OIDCProvider:
    """oidc-provider-mock as a separate process (Flask + authlib), with predefined users and their claims."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        users = [
            {"sub": "alice", "email": "alice@example.com", "groups": ["developers", "oncall"]},
            {"sub": "mallory", "groups": ["system:masters"]},
            {"sub": "ci-job-7", "groups": ["ci"]},
        ]
        args = [str(VENV_BIN / "oidc-provider-mock"), "--port", str(self.port), "--require-nonce", "true"]
        for user in users:
            args += ["--user-claims", json.dumps(user)]
        self.log = directory / "oidc-provider.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(args, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/.well-known/openid-configuration", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"oidc-provider-mock did not start: {self.log.read_text()}")

    def authorize(self, browser: Browser, authorize_url: str, sub: str, deny: bool = False) -> str:
        return mock_idp_authorize(browser, authorize_url, sub, deny)

    def id_token(self, client_id: str, sub: str) -> str:
        """An ID token for `client_id`, through the real code flow (what a CI system's IdP would hand out)."""
        redirect_uri = "http://127.0.0.1/ci-callback"
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid",
            "state": "s",
            "nonce": secrets.token_hex(8),
        }
        browser = Browser(Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"))
        location = self.authorize(
            browser, f"{self.url}/oauth2/authorize?{urllib.parse.urlencode(params)}", sub
        )
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
        form = urllib.parse.urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": client_id,
                "client_secret": "any",
            }
        ).encode()
        with urllib.request.urlopen(f"{self.url}/oauth2/token", data=form, timeout=10) as response:
            return json.loads(response.read())["id_token"]


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OIDCProvider]:
    server = OIDCProvider(tmp_path_factory.mktemp("oidc-provider"))
    yield server
    stop_process(server.process)


@pytest.fixture(scope="module")
def saml_idp(tmp_path_factory: pytest.TempPathFactory) -> SAMLIdP:
    return SAMLIdP(tmp_path_factory.mktemp("saml-idp"))


@pytest.fixture(scope="module")
def login_gateway(sandbox, provider, saml_idp, tmp_path_factory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gw-login")
    (directory / "client-secret").write_text("not-so-secret\n")
    config = gateway_config(sandbox, directory, free_port())
    sandbox_connection = config["connections"]["sandbox"]
    sandbox_connection["plugins"]["login"] = {}
    # CI tokens (ID tokens for another audience) are accepted directly and may be exchanged.
    sandbox_connection["plugins"]["oidc"] = {
        "issuers": [{"issuer": provider.url, "audiences": [CI_CLIENT_ID]}]
    }
    config["connections"]["other"] = {
        "upstream": dict(sandbox_connection["upstream"]),
        "plugins": {"login": {"providers": ["corp-saml"]}},
    }
    config["plugins"] = {
        "login": {
            "allow_exchange": True,
            "token_ttl_seconds": 3600,
            "providers": [
                {
                    "type": "oidc",
                    "name": "mock",
                    "title": "Mock IdP",
                    "issuer": provider.url,
                    "client_id": CLIENT_ID,
                    "client_secret_file": "client-secret",
                    "scopes": ["openid", "email"],
                    "keep_claims": ["email"],
                },
                {
                    "type": "saml",
                    "name": "corp-saml",
                    "idp_metadata_file": str(saml_idp.metadata_file),
                    "groups_attribute": "memberOf",
                    "keep_attributes": ["mail"],
                },
            ],
        }
    }
    gw = start_gateway(directory, config)
    yield gw
    stop_process(gw.process)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KUBEGATE_CACHE_DIR": str(tmp_path / "cache"), "BROWSER": "false"}


def oidc_browser_login(
    gw: Gateway, provider: OIDCProvider, login_url: str, code: str, sub: str = "alice"
) -> str:
    return browser_login(gw.url, gw.ca_file, "mock", provider.url, login_url, code, sub)


def test_kubegate_login_then_kubectl_runs_through_the_exec_plugin(login_gateway, provider, sandbox, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "clusters": [
        {"name": "keep-me", "cluster": {"server": "https://elsewhere.example:6443"}}]}))  # fmt: skip
    env = _env(tmp_path)
    login = subprocess.Popen(
        [KUBEGATE, "login", "--gateway", login_gateway.url, "--connection", "sandbox",
         "--certificate-authority", str(login_gateway.ca_file), "--kubeconfig", str(kubeconfig), "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        url, code = read_login_prompt(login.stderr)
        page = oidc_browser_login(login_gateway, provider, url, code)
        assert f'Logged in as <span id="user">{provider.url}#alice</span>' in page
        out, err = login.communicate(timeout=30)
    finally:
        login.kill()
    assert login.returncode == 0, err
    assert out == ""
    assert f"Logged in as {provider.url}#alice" in err

    config = yaml.safe_load(kubeconfig.read_text())
    assert config["current-context"] == "kubegate-sandbox"
    assert {c["name"] for c in config["clusters"]} == {"keep-me", "kubegate-sandbox"}
    user = next(u for u in config["users"] if u["name"] == "kubegate-sandbox")["user"]
    assert user["exec"]["apiVersion"] == "client.authentication.k8s.io/v1"
    assert user["exec"]["command"] == KUBEGATE
    assert "token" not in user

    before = sandbox.requests_log()
    since = before[-1]["id"] if before else 0
    proc = run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["status"]["userInfo"]
    assert info["username"] == f"{provider.url}#alice"
    assert set(info["groups"]) >= {"oidc:developers", "oidc:oncall"}
    run_kubectl(kubeconfig, "get", "pods", "-n", "prod", env=env, check=True)
    records = sandbox.requests_log(since)
    assert records and all(r["impersonate_user"] == f"{provider.url}#alice" for r in records)
    assert all(sorted(r["impersonate_groups"]) == ["oidc:developers", "oidc:oncall"] for r in records)

    # The token is cached for kubectl, stored only hashed by the gateway, never logged.
    # (the cache also remembers the last login's gateway for `kubegate approvals`: last-login.json)
    token_file = next(p for p in (tmp_path / "cache").glob("*.json") if p.name != "last-login.json")
    cached = json.loads(token_file.read_text())
    token = cached["token"]
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    database = Path(login_gateway.config.parent / "state" / "kubegate.db")
    with sqlite3.connect(database) as db:
        rows = db.execute("select user, token_hash, method, provider from kubegate_tokens").fetchall()
    assert (f"{provider.url}#alice", hashlib.sha256(token.encode()).hexdigest(), "oidc", "mock") in rows
    for path in database.parent.glob("kubegate.db*"):
        assert token.encode() not in path.read_bytes()
    assert token not in login_gateway.log.read_text()

    listing = subprocess.run([KUBEGATE, "tokens", "list", "-c", str(login_gateway.config)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert cached["id"] in listing.stdout and f"{provider.url}#alice" in listing.stdout

    # Revoked: the next request is refused with a reason (after at most revocation_check_seconds).
    revoke = subprocess.run([KUBEGATE, "tokens", "revoke", cached["id"], "-c", str(login_gateway.config)],
                            capture_output=True, text=True)  # fmt: skip
    assert revoke.returncode == 0 and f"revoked {cached['id']}" in revoke.stdout
    status = wait_for(lambda: (s := _api_status(login_gateway, "sandbox", token))["code"] == 401 and s,
                      "the gateway to refuse the revoked token")  # fmt: skip
    assert status["message"] == "Unauthorized: gateway token revoked: run kubegate login"
    listing = subprocess.run([KUBEGATE, "tokens", "list", "--all", "-c", str(login_gateway.config)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert re.search(rf"{cached['id']}.*revoked", listing.stdout)


def _api_status(gw: Gateway, connection: str, token: str) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    request = urllib.request.Request(
        f"{gw.url}/k8s/{connection}/api/v1/namespaces/prod/pods", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return {"code": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


# -- the CLI half over the JSON API (what `kubegate login` does), for the cases below -------------------------


class CLILogin:
    def __init__(self, gw: Gateway, connection: str = "sandbox"):
        self.gw = gw
        self.verifier = secrets.token_urlsafe(32)
        status, body = _post(gw, "/login/cli", {
            "code_challenge": hashlib.sha256(self.verifier.encode()).hexdigest(), "connection": connection})  # fmt: skip
        assert status == 200, body
        self.id, self.url, self.code = body["login_id"], body["login_url"], body["user_code"]

    def collect(self) -> tuple[int, dict[str, Any]]:
        return _post(self.gw, "/login/cli/token", {"login_id": self.id, "code_verifier": self.verifier})


def _post(
    gw: Gateway, path: str, body: dict[str, Any], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{gw.url}{path}", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def saml_round_trip(
    gw: Gateway, idp: SAMLIdP, login: CLILogin, **response_options: Any
) -> tuple[int, str, Any]:
    """Start the login at the SAML provider, let the IdP answer, post its answer to the gateway's ACS."""
    browser = Browser(gw.ca_file)
    status, headers, page = browser.open(f"{gw.url}/login/start/corp-saml?request={login.id}")
    assert status == 302, page
    assert headers["Location"].startswith(idp.sso_url + "?SAMLRequest=")
    request = idp.read_request(headers["Location"])
    assert request.acs_url == f"{gw.url}/login/saml/corp-saml/acs"
    assert request.relay_state == login.id
    options = {"name_id": "alice", "attributes": {"memberOf": ["ops", "dba"], "mail": ["alice@corp.example"]}}
    options.update(response_options)
    saml_response = idp.response(request, **options)
    status, _, page = browser.open(
        f"{gw.url}/login/saml/corp-saml/acs", {"SAMLResponse": saml_response, "RelayState": login.id}
    )
    return status, page, (request, saml_response)


def test_saml_login_maps_attributes_and_the_token_works_with_kubectl(login_gateway, saml_idp, tmp_path):
    login = CLILogin(login_gateway)
    assert login.collect() == (202, {"status": "pending"})
    status, page, _ = saml_round_trip(login_gateway, saml_idp, login)
    user = f"{saml_idp.entity_id}#alice"
    assert status == 200 and f'<span id="user">{user}</span>' in page, page
    status, body = login.collect()
    assert status == 200, body
    assert body["user"] == user and body["groups"] == ["saml:ops", "saml:dba"] and body["method"] == "saml"
    assert login.collect()[0] == 410  # a login hands out one token, once
    kubeconfig = login_gateway.kubeconfig("saml-alice", token=body["token"])
    info = json.loads(run_kubectl(kubeconfig, "auth", "whoami", "-o", "json", check=True).stdout)
    assert info["status"]["userInfo"]["username"] == user
    assert set(info["status"]["userInfo"]["groups"]) >= {"saml:ops", "saml:dba"}
    # `other` accepts only corp-saml tokens: this one works there too.
    run_kubectl(
        login_gateway.kubeconfig("saml-alice", "other", token=body["token"]), "auth", "whoami", check=True
    )


def test_login_pages_load_nothing_and_cannot_be_framed(login_gateway):
    login = CLILogin(login_gateway)
    status, headers, page = Browser(login_gateway.ca_file).open(login.url)
    assert status == 200 and login.code in page
    assert (
        headers["Content-Security-Policy"]
        == "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    )
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert "<script" not in page and "http://" not in page.replace(login_gateway.url, "")


def test_saml_sp_metadata(login_gateway):
    status, headers, xml = Browser(login_gateway.ca_file).open(f"{login_gateway.url}/login/saml/corp-saml")
    assert status == 200 and headers["Content-Type"].startswith("application/samlmetadata+xml")
    assert f'entityID="{login_gateway.url}/login/saml/corp-saml"' in xml
    assert f'Location="{login_gateway.url}/login/saml/corp-saml/acs"' in xml
    assert 'WantAssertionsSigned="true"' in xml


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"sign": False}, "not signed"),
        ({"audience": "https://someone-else.example/sp"}, "audience"),
        ({"lifetime_seconds": -600, "issued_offset_seconds": -1200}, "expired"),
        ("other-key", "signature"),
        ({"attributes": {"memberOf": ["system:masters"]}}, "group 'system:masters' is not allowed"),
    ],
    ids=["unsigned", "wrong-audience", "expired", "signed-by-another-key", "system-group"],
)
def test_bad_saml_responses_are_refused(login_gateway, saml_idp, options, reason):
    if options == "other-key":
        key, cert = make_signing_pair("impostor")
        options = {"signing_key": key, "signing_cert": cert}
    login = CLILogin(login_gateway)
    status, page, _ = saml_round_trip(login_gateway, saml_idp, login, **options)
    assert status == 400 and "Login failed" in page
    assert reason.lower() in html.unescape(page).lower(), page
    status, body = login.collect()
    assert status == 403 and reason.lower() in body["error"].lower()


def test_replayed_saml_assertion_is_refused(login_gateway, saml_idp):
    first = CLILogin(login_gateway)
    status, page, (_, saml_response) = saml_round_trip(
        login_gateway, saml_idp, first, assertion_id="_replayed-1"
    )
    assert status == 200, page
    # The very same POST again: refused.
    status, _, page = Browser(login_gateway.ca_file).open(
        f"{login_gateway.url}/login/saml/corp-saml/acs",
        {"SAMLResponse": saml_response, "RelayState": first.id},
    )
    assert status == 400
    # A fresh, valid response for another login that reuses the assertion ID: refused as a replay.
    second = CLILogin(login_gateway)
    status, page, _ = saml_round_trip(login_gateway, saml_idp, second, assertion_id="_replayed-1")
    assert status == 400 and "already used" in page
    assert second.collect()[0] == 403


def test_unsolicited_saml_response_is_refused(login_gateway, saml_idp):
    login = CLILogin(login_gateway)
    _, _, (request, _) = saml_round_trip(login_gateway, saml_idp, CLILogin(login_gateway))
    # An IdP-initiated (or stolen) response answering another request does not complete this login.
    status, _, page = Browser(login_gateway.ca_file).open(
        f"{login_gateway.url}/login/saml/corp-saml/acs",
        {"SAMLResponse": saml_idp.response(request, "alice"), "RelayState": login.id},
    )
    # It answers no request this login made (the login was not even started at the IdP).
    assert status == 400 and "InResponseTo" in page
    assert login.collect()[0] == 403
    login = CLILogin(login_gateway)
    Browser(login_gateway.ca_file).open(f"{login_gateway.url}/login/start/corp-saml?request={login.id}")
    status, _, page = Browser(login_gateway.ca_file).open(
        f"{login_gateway.url}/login/saml/corp-saml/acs",
        {"SAMLResponse": saml_idp.response(request, "alice"), "RelayState": login.id},
    )
    assert status == 400 and "InResponseTo" in page
    assert login.collect()[0] == 403


def test_oidc_login_refusals_reach_the_cli(login_gateway, provider):
    # The person denies at the IdP.
    login = CLILogin(login_gateway)
    browser = Browser(login_gateway.ca_file)
    status, headers, _ = browser.open(f"{login_gateway.url}/login/start/mock?request={login.id}")
    authorize_url = headers["Location"]
    callback = provider.authorize(browser, authorize_url, "alice", deny=True)
    status, _, page = browser.open(callback)
    assert status == 400 and "access_denied" in page
    # This mock leaves `state` out of its error redirect, so the gateway cannot tell which login was
    # refused; an IdP following RFC 6749 §4.1.2.1 sends it, and then the waiting CLI learns at once.
    assert login.collect()[0] == 202
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize_url).query)["state"][0]
    status, _, page = browser.open(
        f"{login_gateway.url}/login/oidc/callback?error=access_denied&state={state}"
    )
    assert status == 400 and "access_denied" in page
    status, body = login.collect()
    assert status == 403 and body["error"] == "the identity provider refused the login: access_denied"
    # A groups claim naming a system group.
    login = CLILogin(login_gateway)
    page = oidc_browser_login(login_gateway, provider, login.url, login.code, sub="mallory")
    assert "Login failed" in page and "group 'system:masters' is not allowed" in html.unescape(page)
    assert login.collect()[0] == 403
    # The callback replayed after the login completed.
    status, _, page = browser.open(callback)
    assert status == 400


def test_cli_login_api_errors(login_gateway):
    assert _post(login_gateway, "/login/cli", {"code_challenge": "short"})[0] == 400
    assert _post(login_gateway, "/login/cli", {"code_challenge": "a" * 64, "connection": "nope"})[0] == 404
    login = CLILogin(login_gateway)
    status, body = _post(login_gateway, "/login/cli/token", {"login_id": login.id, "code_verifier": "wrong"})
    assert status == 404 and body == {"error": "no such login"}
    status, _, page = Browser(login_gateway.ca_file).open(f"{login_gateway.url}/login?request=unknown")
    assert status == 400 and "not known" in page
    status, _, page = Browser(login_gateway.ca_file).open(
        f"{login_gateway.url}/login/start/nope?request={login.id}"
    )
    assert status == 400 and "no login provider" in page


def test_a_flood_of_unauthenticated_login_starts_stores_nothing_and_locks_no_one_out(login_gateway, provider):
    # Red team: every credential-less `POST /login/cli` stored a waiting login, and past 10,000 of them the
    # gateway answered every `kubegate login` (and `kubegate credential` logging in again) 503 for ten
    # minutes. A start is now a signed ticket: the flood stores nothing, and a person still logs in.
    host, _, port = login_gateway.url.removeprefix("https://").partition(":")
    connection = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(login_gateway.ca_file))
    )
    body = json.dumps({"code_challenge": "f" * 64, "description": "flood"})
    statuses = []
    for _ in range(1000):
        connection.request("POST", "/login/cli", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    connection.close()
    assert set(statuses) == {200}
    database = Path(login_gateway.config.parent / "state" / "kubegate.db")
    with sqlite3.connect(database) as db:
        (stored,) = db.execute(
            "select count(*) from kubegate_login_requests where description = 'flood'"
        ).fetchone()
    assert stored == 0
    login = CLILogin(login_gateway)
    page = oidc_browser_login(login_gateway, provider, login.url, login.code)
    assert "Logged in as" in page, page
    status, body = login.collect()
    assert status == 200 and body["user"] == f"{provider.url}#alice"


def test_ci_token_is_used_directly_or_exchanged_for_a_connection_bound_token(login_gateway, provider):
    id_token = provider.id_token(CI_CLIENT_ID, "ci-job-7")
    direct = json.loads(run_kubectl(login_gateway.kubeconfig("ci", token=id_token), "auth", "whoami", "-o", "json",
                                    check=True).stdout)  # fmt: skip
    assert direct["status"]["userInfo"]["username"] == f"{provider.url}#ci-job-7"

    status, body = _post(login_gateway, "/login/exchange", {"connection": "sandbox"}, token=id_token)
    assert status == 200, body
    assert body["connection"] == "sandbox" and body["method"] == "exchange"
    token = body["token"]
    info = json.loads(run_kubectl(login_gateway.kubeconfig("ci", token=token), "auth", "whoami", "-o", "json",
                                  check=True).stdout)  # fmt: skip
    assert info["status"]["userInfo"]["username"] == f"{provider.url}#ci-job-7"
    assert "oidc:ci" in info["status"]["userInfo"]["groups"]
    status = _api_status(login_gateway, "other", token)
    assert status["message"] == "Unauthorized: this gateway token is for connection sandbox"
    # Nothing to exchange, a bad token, a gateway token: each refused with a reason.
    assert _post(login_gateway, "/login/exchange", {"connection": "sandbox"})[0] == 401
    status, body = _post(
        login_gateway, "/login/exchange", {"connection": "sandbox"}, token=id_token[:-4] + "AAAA"
    )
    assert status == 401 and body["error"] == "Unauthorized: signature verification failed"
    assert _post(login_gateway, "/login/exchange", {"connection": "sandbox"}, token=token)[0] == 400


def test_expired_cached_token_makes_kubectl_log_in_again(login_gateway, provider, tmp_path):
    env = _env(tmp_path)
    kubeconfig = tmp_path / "kubeconfig"
    ca = str(login_gateway.ca_file)
    target = ["--gateway", login_gateway.url, "--connection", "sandbox", "--certificate-authority", ca]
    # Set up the kubeconfig as `kubegate login` does, with a cached token that has just expired.
    from kubegate.plugins.login.client import Target, cache_path, update_kubeconfig

    update_kubeconfig(kubeconfig, Target(login_gateway.url, "sandbox", ca), KUBEGATE)
    os.environ["KUBEGATE_CACHE_DIR"] = env["KUBEGATE_CACHE_DIR"]
    try:
        path = cache_path(Target(login_gateway.url, "sandbox", ca))
    finally:
        del os.environ["KUBEGATE_CACHE_DIR"]
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "kgt_expired", "expires_at": time.time() - 5}))
    kubectl = subprocess.Popen(
        [str(VENV_BIN / "kubectl"), "auth", "whoami", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip
    try:
        url, code = read_login_prompt(kubectl.stderr)  # kubectl passes the plugin's prompt through
        oidc_browser_login(login_gateway, provider, url, code)
        out, err = kubectl.communicate(timeout=30)
    finally:
        kubectl.kill()
    assert kubectl.returncode == 0, err
    assert json.loads(out)["status"]["userInfo"]["username"] == f"{provider.url}#alice"
    assert json.loads(path.read_text())["expires_at"] > time.time() + 3000
    # logout revokes it at the gateway and forgets it locally
    token = json.loads(path.read_text())["token"]
    out = subprocess.run([KUBEGATE, "logout", *target], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "revoked token" in out.stderr, out.stderr
    assert not path.exists()
    wait_for(lambda: _api_status(login_gateway, "sandbox", token)["code"] == 401,
             "the gateway to refuse the logged-out token")  # fmt: skip


def saml_form_page(saml_idp: SAMLIdP, route: Any, request: Any, **options: Any) -> None:
    """Play the IdP's page in the browser: a form that POSTs the signed answer for alice to the gateway (from
    the IdP's own site, so the POST is cross-site, as in real life)."""
    authn = saml_idp.read_request(request.url)
    response = saml_idp.response(authn, name_id="alice", **options)
    form = (f'<form method="post" action="{html.escape(authn.acs_url)}">'
            f'<input type="hidden" name="SAMLResponse" value="{html.escape(response)}">'
            f'<input type="hidden" name="RelayState" value="{html.escape(authn.relay_state)}">'
            "<button>Continue</button></form>")  # fmt: skip
    route.fulfill(status=200, content_type="text/html", body=f"<!doctype html><body>{form}</body>")


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_web_ui_login_through_saml_in_a_browser(login_gateway, saml_idp):
    """The web UI's login at a SAML IdP, in Chromium: the IdP answers with a POSTed form from its own site
    (played here by a route that signs the assertion), and the browser ends up logged in at /ui/."""
    from playwright.sync_api import sync_playwright

    def idp_page(route, request) -> None:
        saml_form_page(saml_idp, route, request, attributes={"memberOf": ["ops"]})

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox",
                                             "--disable-gpu", "--disable-background-networking"])  # fmt: skip
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.route("https://idp.example.test/**", idp_page)
            page.goto(f"{login_gateway.url}/ui/")
            page.locator('a[href="/ui/login/start/corp-saml"]').click()
            page.get_by_role("button", name="Continue").click()  # the IdP's form, posted cross-site
            page.wait_for_url(re.compile(r"/ui/$"), timeout=20_000)
            assert f"{saml_idp.entity_id}#alice" in page.locator(".me").inner_text()
        finally:
            browser.close()


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_web_ui_login_forwarded_to_another_browser_logs_nobody_in(login_gateway, saml_idp):
    """Mallory starts a UI login and sends the identity provider's link to alice: alice's browser finishes
    it, so the login fails there — and Mallory's browser cannot collect a token in alice's name."""
    from playwright.sync_api import sync_playwright

    captured: list[str] = []

    def capture(route, request) -> None:
        captured.append(request.url)
        route.fulfill(status=200, content_type="text/html", body="<p>link copied</p>")

    def idp_page(route, request) -> None:
        saml_form_page(saml_idp, route, request)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox",
                                             "--disable-gpu", "--disable-background-networking"])  # fmt: skip
        try:
            mallory = browser.new_context(ignore_https_errors=True).new_page()
            mallory.route("https://idp.example.test/**", capture)
            mallory.goto(f"{login_gateway.url}/ui/login")
            mallory.locator('a[href="/ui/login/start/corp-saml"]').click()
            mallory.wait_for_url(re.compile("idp.example.test"))
            (link,) = captured
            alice = browser.new_context(ignore_https_errors=True).new_page()
            alice.route("https://idp.example.test/**", idp_page)
            alice.goto(link)
            alice.get_by_role("button", name="Continue").click()
            alice.get_by_text("started in another browser").wait_for()
            relay = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["RelayState"][0]
            mallory.goto(f"{login_gateway.url}/ui/login/finish?request={relay}")
            assert "ended in another browser" in mallory.content()
            assert not [c for c in mallory.context.cookies() if c["name"] == "kubegate_session"]
        finally:
            browser.close()
