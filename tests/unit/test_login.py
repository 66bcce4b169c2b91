"""The login plugin's parts without a network: token store, token checks, the CLI login handshake, the
exec-credential client and config validation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubetest import base_config, run_kubegate
from sqlmodel import select

from kubegate.core.db import Database
from kubegate.core.flow import AuthFailure, Identity
from kubegate.plugins.login import client, store
from kubegate.plugins.login.oidc_flow import LoginError
from kubegate.plugins.login.service import CollectError, LoginService
from kubegate.plugins.login.settings import LoginConnectionSettings, LoginSettings

KUBEGATE = str(Path(sys.executable).parent / "kubegate")
ALICE = {"user": "https://idp#alice", "groups": ["oidc:dev"], "issuer": "https://idp", "method": "oidc",
         "provider": "corp", "claims": {"email": "a@x"}}  # fmt: skip


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    db.create_tables()
    return db


def service(database: Database, **settings) -> LoginService:
    login_settings = LoginSettings.model_construct(
        **{**LoginSettings.model_construct(providers=[]).__dict__, **settings}
    )
    return LoginService(database, login_settings, "https://gw.example")


def test_tokens_are_stored_hashed_and_listed_until_revoked(database, tmp_path):
    token, record = database.call(
        lambda s: store.mint_token(s, ALICE, ttl_seconds=3600, connection=None, description="cli")
    )
    assert token.startswith(f"kgt_{record.id}_") and len(token) > 50
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token.encode() not in (tmp_path / "kubegate.db").read_bytes()
    found = database.call(lambda s: store.find_token(s, record.token_hash))
    assert found is not None and found.groups == ["oidc:dev"] and found.claims == {"email": "a@x"}
    assert [r.id for r in database.call(lambda s: store.list_tokens(s))] == [record.id]
    revoked = database.call(lambda s: store.revoke_tokens(s, user=ALICE["user"], by="test"))
    assert [r.id for r in revoked] == [record.id]
    assert database.call(lambda s: store.list_tokens(s)) == []
    (inactive,) = database.call(lambda s: store.list_tokens(s, include_inactive=True))
    assert inactive.state(time.time()) == "revoked" and inactive.revoked_by == "test"
    assert database.call(lambda s: store.revoke_tokens(s, token_id=record.id, by="again")) == []


async def test_token_checks_give_reasons_and_see_revocation(database):
    svc = service(database, revocation_check_seconds=0.0)
    token, record = await database.run(
        lambda s: store.mint_token(s, ALICE, ttl_seconds=60, connection="prod", description="")
    )
    identity = await svc.check(token, "prod", None)
    assert isinstance(identity, Identity)
    assert (
        identity.user == ALICE["user"]
        and identity.groups == ("oidc:dev",)
        and identity.method == "login:oidc"
    )
    assert identity.claims["token_id"] == record.id and identity.expires_at == record.expires_at
    assert await svc.check(token, "staging", None) == AuthFailure("this gateway token is for connection prod")
    only_saml = LoginConnectionSettings(providers=["saml"])
    assert await svc.check(token, "prod", only_saml) == AuthFailure(
        "tokens from login provider corp are not accepted here"
    )
    assert await svc.check("kgt_nope", "prod", None) == AuthFailure("malformed gateway token")
    unknown = f"kgt_{'0' * 12}_{'A' * 43}"
    assert await svc.check(unknown, "prod", None) == AuthFailure("unknown gateway token: run kubegate login")
    await database.run(lambda s: store.revoke_tokens(s, token_id=record.id, by="t"))
    assert await svc.check(token, "prod", None) == AuthFailure("gateway token revoked: run kubegate login")
    expired, _ = await database.run(
        lambda s: store.mint_token(
            s, ALICE, ttl_seconds=60, connection=None, description="", now=time.time() - 120
        )
    )
    assert await svc.check(expired, "prod", None) == AuthFailure("gateway token expired: run kubegate login")


async def test_exchanged_tokens_can_be_refused_per_connection(database):
    svc = service(database, exchange_token_ttl_seconds=600, revocation_check_seconds=0.0)
    ci = Identity(
        user="https://idp#job",
        groups=("oidc:ci",),
        method="oidc",
        issuer="https://idp",
        expires_at=time.time() + 60,
    )
    token, summary = await svc.exchange(ci, "prod", "curl")
    assert summary["method"] == "exchange" and summary["connection"] == "prod"
    assert 590 < summary["expires_at"] - time.time() <= 600  # its own lifetime, not the CI token's
    assert isinstance(await svc.check(token, "prod", LoginConnectionSettings()), Identity)
    refused = await svc.check(token, "prod", LoginConnectionSettings(allow_exchanged=False))
    assert refused == AuthFailure("exchanged tokens are not accepted on this connection")


async def test_cli_login_hands_out_one_token_to_the_holder_of_the_verifier(database):
    svc = service(database, token_ttl_seconds=3600, login_timeout_seconds=600)
    verifier = "v" * 40
    login = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), "prod", "test")
    with pytest.raises(CollectError) as wrong:
        await svc.collect(login.id, "not-the-verifier")
    assert wrong.value.status == 404
    with pytest.raises(CollectError) as pending:
        await svc.collect(login.id, verifier)
    assert pending.value.status == 202
    await svc._authenticated(login, "corp", dict(ALICE))
    token, summary = await svc.collect(login.id, verifier)
    assert token.startswith("kgt_") and summary["user"] == ALICE["user"] and summary["connection"] is None
    with pytest.raises(CollectError) as again:
        await svc.collect(login.id, verifier)
    assert again.value.status == 410
    row = await database.run(lambda s: store.get_login(s, login.key))
    assert row.identity is None  # nothing about the person stays behind


async def test_concurrent_checks_of_one_token_share_one_lookup(database):
    svc = service(database, revocation_check_seconds=60.0)
    token, _ = await database.run(
        lambda s: store.mint_token(s, ALICE, ttl_seconds=60, connection=None, description="")
    )
    calls = 0
    real_run = database.run

    async def counting_run(fn):
        nonlocal calls
        calls += 1
        return await real_run(fn)

    database.run = counting_run  # type: ignore[method-assign]
    answers = await asyncio.gather(*(svc.check(token, "prod", None) for _ in range(20)))
    assert all(isinstance(a, Identity) for a in answers)
    assert calls == 1
    await svc.check(token, "prod", None)
    assert calls == 1  # cached within revocation_check_seconds


def test_seen_assertions_refuse_a_second_use(database):
    until = time.time() + 300
    assert database.call(lambda s: store.remember_assertion(s, "_a1", "idp", until)) is True
    assert database.call(lambda s: store.remember_assertion(s, "_a1", "idp", until)) is False
    assert database.call(lambda s: store.remember_assertion(s, "_a2", "idp", until)) is True


def test_exec_credential_format():
    credential = client.exec_credential("kgt_x", 1_800_000_000)
    assert credential == {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "kgt_x", "expirationTimestamp": "2027-01-15T08:00:00Z"},
    }


def test_cached_token_is_not_used_near_its_expiry(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEGATE_CACHE_DIR", str(tmp_path))
    target = client.Target("https://gw.example", "prod")
    client.write_cached(target, {"token": "kgt_a", "expires_at": time.time() + 3600, "user": "u"})
    assert client.read_cached(target)["token"] == "kgt_a"
    assert oct(client.cache_path(target).stat().st_mode & 0o777) == "0o600"
    client.write_cached(target, {"token": "kgt_a", "expires_at": time.time() + 30})
    assert client.read_cached(target) is None
    client.cache_path(target).write_text("{not json")
    assert client.read_cached(target) is None


def test_kubeconfig_update_keeps_other_entries_and_replaces_its_own(tmp_path):
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "mine",
        "clusters": [{"name": "mine", "cluster": {"server": "https://k"}}],
        "users": [{"name": "mine", "user": {"token": "t"}}],
        "contexts": [{"name": "mine", "context": {"cluster": "mine", "user": "mine"}}],
    }))  # fmt: skip
    target = client.Target("https://gw.example", "prod")
    for _ in range(2):
        assert client.update_kubeconfig(path, target, "/opt/kubegate", set_current=False) == "kubegate-prod"
    config = yaml.safe_load(path.read_text())
    assert config["current-context"] == "mine"
    assert [c["name"] for c in config["clusters"]] == ["mine", "kubegate-prod"]
    assert config["clusters"][1]["cluster"] == {"server": "https://gw.example/k8s/prod"}
    exec_ = config["users"][1]["user"]["exec"]
    assert exec_["command"] == "/opt/kubegate"
    assert exec_["args"] == ["credential", "--gateway", "https://gw.example", "--connection", "prod"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_credential_refuses_an_exec_api_version_it_does_not_speak(tmp_path):
    proc = subprocess.run(
        [KUBEGATE, "credential", "--gateway", "https://127.0.0.1:1", "--connection", "prod"],
        capture_output=True, text=True, timeout=30,
        env={"KUBERNETES_EXEC_INFO": json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1"}),
             "KUBEGATE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "kubegate: error: kubectl asked for client.authentication.k8s.io/v1beta1; "
        "kubegate speaks client.authentication.k8s.io/v1"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["login", "--gateway", "gw.example", "--connection", "p"], "--gateway must be a URL"),
        (["login", "--gateway", "https://127.0.0.1:1", "--connection", "p"], "cannot reach the gateway at https://127.0.0.1:1"),
        (["credential", "--gateway", "https://127.0.0.1:1", "--connection", "p", "--certificate-authority", "/nope"], "no such file: /nope"),
    ],
)  # fmt: skip
def test_cli_login_errors_are_one_line(tmp_path, args, message):
    proc = subprocess.run([KUBEGATE, *args], capture_output=True, text=True, timeout=30,
                          env={"KUBEGATE_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("kubegate: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


OIDC_PROVIDER = {"type": "oidc", "name": "o", "issuer": "https://o", "client_id": "c"}
SAML_PROVIDER = {
    "type": "saml",
    "name": "corp",
    "idp_entity_id": "https://idp",
    "idp_sso_url": "https://idp/sso",
}


@pytest.mark.parametrize(
    ("plugins", "key", "reason"),
    [
        ({"nosuch": {}}, "plugins.nosuch", "not a gateway-wide plugin"),
        ({"login": {}}, "plugins.login.providers", "required key is missing"),
        ({"login": {"providers": [{"type": "oidc", "name": "x", "issuer": "https://i"}]}},
         "plugins.login.providers.0.oidc.client_id", "required key is missing"),
        ({"login": {"providers": [{"type": "oidc", "name": "x", "issuer": "http://idp.example", "client_id": "c"}]}},
         "plugins.login.providers.0.oidc", "https"),
        ({"login": {"providers": [SAML_PROVIDER]}}, "plugins.login.providers.0.saml", "idp_certificate_file"),
        ({"login": {"providers": [OIDC_PROVIDER, OIDC_PROVIDER]}}, "plugins.login", "listed twice"),
        ({"login": {"providers": [{"type": "ldap", "name": "x"}]}}, "plugins.login.providers.0", "ldap"),
        ({"login": {"providers": [{**OIDC_PROVIDER, "client_secret_file": "no-such-secret"}]}},
         "plugins.login.providers.0.oidc.client_secret_file", "cannot read client_secret_file"),
    ],
)  # fmt: skip
def test_bad_login_settings_name_the_key(tmp_path, plugins, key, reason):
    config = base_config(tmp_path)
    config["plugins"] = plugins
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"kubegate: error: {tmp_path / 'kubegate.yaml'}: {key}: "), line
    assert reason in line and "Traceback" not in proc.stderr


def test_saml_provider_from_metadata_or_explicit_settings(tmp_path):
    from saml_idp import SAMLIdP

    idp = SAMLIdP(tmp_path / "idp")
    from_metadata = LoginSettings.model_validate(
        {"providers": [{"type": "saml", "name": "a", "idp_metadata_file": str(idp.metadata_file)}]}
    ).providers[0]
    explicit = LoginSettings.model_validate(
        {
            "providers": [
                {
                    **SAML_PROVIDER,
                    "idp_entity_id": idp.entity_id,
                    "idp_sso_url": idp.sso_url,
                    "idp_certificate_file": str(idp.cert_file),
                }
            ]
        }
    ).providers[0]
    for provider in (from_metadata, explicit):
        assert provider.idp_entity_id == idp.entity_id and provider.idp_sso_url == idp.sso_url
        assert provider.idp["x509cert"].replace("\n", "") in idp.cert_pem.replace("\n", "")


@pytest.mark.parametrize(
    ("providers", "reason"),
    [
        ([{**SAML_PROVIDER, "idp_certificate_file": "missing.pem"}], "cannot read idp_certificate_file"),
        ([{**SAML_PROVIDER, "idp_certificate_file": "kubegate.yaml"}], "not a PEM certificate"),
        ([{"type": "saml", "name": "x", "idp_metadata_file": "kubegate.yaml"}], "not usable IdP metadata"),
        ([{**SAML_PROVIDER, "idp_certificate_file": "cert.pem", "username_prefix": "corp:"},
          {"type": "oidc", "name": "o", "issuer": "https://o", "client_id": "c",
           "claim_mappings": {"username": {"prefix": "corp:"}}}], "could collide"),
    ],
)  # fmt: skip
def test_bad_saml_and_prefix_settings(tmp_path, providers, reason):
    from saml_idp import SAMLIdP

    (tmp_path / "cert.pem").write_text(SAMLIdP(tmp_path / "idp").cert_pem)
    config = base_config(tmp_path)
    config["plugins"] = {"login": {"providers": providers}}
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_database_url_names_the_key(tmp_path):
    config = base_config(tmp_path)
    config["database"] = {"url": "not a url"}
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2
    assert "database.url: not a database URL" in proc.stderr


def test_tokens_cli_lists_and_revokes(tmp_path):
    config = base_config(tmp_path)
    config["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    database = Database(f"sqlite:///{tmp_path / 'state' / 'kubegate.db'}")
    _, record = database.call(
        lambda s: store.mint_token(s, ALICE, ttl_seconds=600, connection=None, description="")
    )
    listed = subprocess.run(
        [KUBEGATE, "tokens", "list", "-c", str(path), "-o", "json"], capture_output=True, text=True
    )
    (item,) = json.loads(listed.stdout)
    assert item["id"] == record.id and item["token_hash"] is None
    revoke = subprocess.run([KUBEGATE, "tokens", "revoke", "-c", str(path)], capture_output=True, text=True)
    assert revoke.returncode == 2 and "say which tokens to revoke" in revoke.stderr
    revoke = subprocess.run(
        [KUBEGATE, "tokens", "revoke", "--user", ALICE["user"], "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert revoke.returncode == 0 and f"revoked {record.id}" in revoke.stdout
    revoke = subprocess.run(
        [KUBEGATE, "tokens", "revoke", record.id, "-c", str(path)], capture_output=True, text=True
    )
    assert revoke.returncode == 2 and f"no active token {record.id}" in revoke.stderr


def test_asyncio_is_not_blocked_by_database_calls(database):
    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await database.run(lambda s: time.sleep(0.05))
        task.cancel()
        return ticks

    assert asyncio.run(main()) > 10


def test_login_and_oidc_prefixes_that_could_collide_stop_the_start(tmp_path):
    from saml_idp import SAMLIdP

    idp = SAMLIdP(tmp_path / "idp")
    config = base_config(tmp_path)
    config["state_dir"] = str(tmp_path / "state")
    config["connections"]["prod"]["plugins"]["login"] = {}
    config["connections"]["prod"]["plugins"]["oidc"] = {"issuers": [
        {"issuer": "https://ci.example", "audiences": ["k"], "claim_mappings": {"username": {"prefix": "corp:"}}}]}  # fmt: skip
    config["plugins"] = {"login": {"providers": [
        {"type": "saml", "name": "sso", "idp_metadata_file": str(idp.metadata_file), "username_prefix": "corp:"}]}}  # fmt: skip
    proc = run_kubegate(tmp_path, config, "serve", "--bind", "127.0.0.1:0")
    assert proc.returncode == 2
    assert (
        "kubegate: error: cannot start: "
        + f"{tmp_path / 'kubegate.yaml'}: plugins.login.providers.sso: user name prefix 'corp:'"
        " overlaps 'corp:' of oidc issuer https://ci.example on connection prod" in proc.stderr
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def login_rows(database: Database) -> int:
    return database.call(lambda s: len(s.exec(select(store.LoginRequest)).all()))


async def test_unauthenticated_login_starts_store_nothing_and_refuse_no_one(database):
    # Starting a login needs no credential: a flood of starts used to fill a gateway-wide cap of waiting
    # logins (10,000) and answer everyone's `kubegate login` 503 for the login timeout (red team).
    svc = service(database, token_ttl_seconds=3600, login_timeout_seconds=600)
    for _ in range(12_000):
        await svc.start_cli_login("a" * 64, None, "flood")
    assert login_rows(database) == 0
    verifier = "v" * 40
    login = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, "mine")
    assert (await svc.pending_login(login.id)).user_code == login.user_code
    await svc._authenticated(login, "corp", dict(ALICE))
    token, summary = await svc.collect(login.id, verifier)
    assert token.startswith("kgt_") and summary["user"] == ALICE["user"]


async def test_refused_logins_are_capped_oldest_first_and_authenticated_ones_kept(database, monkeypatch):
    # A refusal (the IdP's error redirect, a bad SAML response) is stored so the waiting CLI learns of it, and
    # anyone can cause one: they are capped, and dropping one only leaves its CLI waiting.
    monkeypatch.setattr(store, "MAX_REFUSED_LOGINS", 5)
    svc = service(database, token_ttl_seconds=3600, login_timeout_seconds=600)
    verifier = "v" * 40
    mine = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, "mine")
    await svc._authenticated(mine, "corp", dict(ALICE))
    refused = []
    for i in range(20):
        login = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, f"n{i}")
        await svc._refuse(login, "corp", "the identity provider refused the login: access_denied")
        refused.append(login)
    assert login_rows(database) == 1 + 5
    with pytest.raises(CollectError) as newest:
        await svc.collect(refused[-1].id, verifier)
    assert newest.value.status == 403 and "access_denied" in newest.value.message
    with pytest.raises(CollectError) as oldest:
        await svc.collect(refused[0].id, verifier)
    assert oldest.value.status == 202  # dropped: that CLI waits until its login expires
    token, _ = await svc.collect(mine.id, verifier)  # the authenticated login was not pushed out
    assert token.startswith("kgt_")


async def test_login_tickets_cannot_be_forged_or_altered(database):
    svc = service(database, token_ttl_seconds=3600, login_timeout_seconds=600)
    verifier = "v" * 40
    login = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, "cli")
    other = service(Database(f"sqlite:///{database.url.split('///')[1]}.other"), login_timeout_seconds=600)
    other.db.create_tables()
    forged = await other.start_cli_login(hashlib.sha256(b"attacker").hexdigest(), None, "kubegate web UI")
    raw = base64.urlsafe_b64decode(login.id + "=" * (-len(login.id) % 4))
    # The same MAC over a payload whose challenge (who may collect) is the attacker's.
    swapped = raw.replace(login.code_challenge.encode(), hashlib.sha256(b"attacker").hexdigest().encode())
    altered = base64.urlsafe_b64encode(swapped).rstrip(b"=").decode()
    respelled = login.id[:10] + "!!!!" + login.id[10:]  # base64 skips the "!": the same bytes
    for bad in (forged.id, altered, respelled, login.id[:-2], "", "not a ticket", "A" * 5000):
        with pytest.raises(LoginError, match="not known"):
            await svc.pending_login(bad)
        with pytest.raises(CollectError) as unknown:
            await svc.collect(bad, "attacker")
        assert unknown.value.status == 404
    # A second replica on the same database signs and reads the same tickets.
    replica = service(database, login_timeout_seconds=600)
    assert (await replica.pending_login(login.id)).key == login.key


async def test_each_login_ends_once_and_expired_tickets_are_refused(database):
    svc = service(database, token_ttl_seconds=3600, login_timeout_seconds=600)
    verifier = "v" * 40
    login = await svc.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, "cli")
    await svc._authenticated(login, "corp", dict(ALICE))
    with pytest.raises(LoginError, match="already completed"):
        await svc._authenticated(login, "corp", {**ALICE, "user": "https://idp#mallory"})
    with pytest.raises(LoginError, match="already completed"):
        await svc.pending_login(login.id)
    expired = service(database, login_timeout_seconds=-1)
    old = await expired.start_cli_login(hashlib.sha256(verifier.encode()).hexdigest(), None, "cli")
    with pytest.raises(LoginError, match="expired"):
        await svc.pending_login(old.id)
    with pytest.raises(CollectError) as gone:
        await svc.collect(old.id, verifier)
    assert gone.value.status == 410


def test_kubectls_credential_plugin_loads_no_server_code():
    # kubectl runs `kubegate credential` before every request: it must not pay for the gateway's server side
    # (the database layer, the login service, the plugin host) — about three quarters of a second here.
    import subprocess
    import sys

    probe = ("import sys, kubegate.core.cli as cli; cli.build_parser(); import kubegate.plugins.login.client; "
             "print(sorted(m for m in ('sqlalchemy', 'aiohttp', 'kubegate.plugins.login.service', "
             "'kubegate.core.plugins', 'authlib', 'onelogin') if m in sys.modules))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
