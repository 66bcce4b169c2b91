"""The `oidc` plugin's verification against a real local IdP: a JWKS and discovery document served over
loopback HTTP by aiohttp, tokens minted with joserfc using real RSA-2048 and P-256 keys."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey
from pydantic import ValidationError

from kubegate.core.flow import AuthFailure, Identity
from kubegate.plugins.oidc import OIDCSettings, Verifier

AUDIENCE = "kubegate-test"


@dataclass
class IdP:
    """A local identity provider: discovery + JWKS, counting every request."""

    url: str = ""
    keys: list[Any] = field(default_factory=list)
    cache_control: str | None = None
    jwks_requests: int = 0
    discovery_requests: int = 0

    def jwks(self) -> dict:
        return KeySet(self.keys).as_dict(private=False)


def make_rsa(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})


def make_ec(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"})


RSA_KEY = make_rsa("rsa-1")
EC_KEY = make_ec("ec-1")


@pytest.fixture(scope="module")
async def idp() -> AsyncIterator[IdP]:
    state = IdP(keys=[RSA_KEY, EC_KEY])

    async def discovery(request: web.Request) -> web.Response:
        state.discovery_requests += 1
        return web.json_response({"issuer": state.url, "jwks_uri": f"{state.url}/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        state.jwks_requests += 1
        headers = {"Cache-Control": state.cache_control} if state.cache_control else {}
        return web.json_response(state.jwks(), headers=headers)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
def fresh_idp(idp: IdP) -> IdP:
    idp.keys = [RSA_KEY, EC_KEY]
    idp.cache_control = None
    return idp


def settings_for(idp: IdP, **entry: Any) -> OIDCSettings:
    return OIDCSettings.model_validate({"issuers": [{"issuer": idp.url, "audiences": [AUDIENCE], **entry}]})


def mint(idp: IdP, key: Any = RSA_KEY, alg: str = "RS256", header: dict | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": idp.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": key.kid, **(header or {})}, payload, key, algorithms=[alg])


def b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def verify(settings: OIDCSettings, token: str) -> Identity | AuthFailure | None:
    return await settings.verifier.authenticate(token)


@pytest.fixture
async def closing() -> AsyncIterator[list[Verifier]]:
    verifiers: list[Verifier] = []
    yield verifiers
    for verifier in verifiers:
        await verifier.close()


def new_settings(closing: list[Verifier], idp: IdP, **entry: Any) -> OIDCSettings:
    settings = settings_for(idp, **entry)
    closing.append(settings.verifier)
    return settings


# -- accepted tokens ------------------------------------------------------------------------------------


async def test_rsa_and_ec_tokens_map_to_prefixed_identity(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp, keep_claims=["email"], claim_mappings={"uid": "sub"})
    for key, alg in ((RSA_KEY, "RS256"), (EC_KEY, "ES256")):
        token = mint(fresh_idp, key, alg, groups=["dev", "ops"], email="a@example.com")
        identity = await verify(settings, token)
        assert isinstance(identity, Identity), identity
        assert identity.user == f"{fresh_idp.url}#alice"
        assert identity.groups == ("oidc:dev", "oidc:ops")
        assert identity.uid == "alice"
        assert identity.method == "oidc"
        assert identity.issuer == fresh_idp.url
        assert identity.claims == {"email": "a@example.com"}
        assert identity.expires_at and identity.expires_at > time.time()
    assert fresh_idp.discovery_requests >= 1


async def test_verified_token_cache_skips_keys_and_signature(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    token = mint(fresh_idp)
    first = await verify(settings, token)
    fetches = fresh_idp.jwks_requests
    assert isinstance(first, Identity)
    assert settings.verifier.verifications == 1
    for _ in range(5):
        assert await verify(settings, token) == first
    assert settings.verifier.verifications == 1
    assert fresh_idp.jwks_requests == fetches


# -- attacks and mistakes -------------------------------------------------------------------------------


async def reason(settings: OIDCSettings, token: str) -> str:
    answer = await verify(settings, token)
    assert isinstance(answer, AuthFailure), answer
    assert token not in answer.reason
    return answer.reason


async def test_alg_none_is_refused(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    now = int(time.time())
    claims = {"iss": fresh_idp.url, "aud": AUDIENCE, "sub": "alice", "exp": now + 600}
    token = f"{b64({'alg': 'none', 'kid': 'rsa-1'})}.{b64(claims)}."
    assert await reason(settings, token) == "algorithm none not allowed"


async def test_hs256_with_the_public_key_as_secret_is_refused(fresh_idp, closing):
    """The classic key-confusion attack: HMAC keyed with the published RSA public key."""
    import hashlib
    import hmac

    settings = new_settings(closing, fresh_idp)
    now = int(time.time())
    claims = {"iss": fresh_idp.url, "aud": AUDIENCE, "sub": "alice", "exp": now + 600}
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'rsa-1'})}.{b64(claims)}"
    secret = RSA_KEY.as_pem(private=False)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert await reason(settings, f"{signing_input}.{b64(mac)}") == "algorithm HS256 not allowed"


async def test_expired_and_not_yet_valid(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    now = int(time.time())
    assert await reason(settings, mint(fresh_idp, exp=now - 120, iat=now - 700)) == "token expired"
    assert await reason(settings, mint(fresh_idp, nbf=now + 300)) == "token not valid yet"
    # within the leeway (60 s) both still pass
    assert isinstance(await verify(settings, mint(fresh_idp, exp=now - 10, iat=now - 600)), Identity)
    assert isinstance(await verify(settings, mint(fresh_idp, nbf=now + 10)), Identity)


async def test_wrong_audience_and_missing_exp(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    assert await reason(settings, mint(fresh_idp, aud="someone-else")) == (
        f"wrong audience (expected one of {AUDIENCE})"
    )
    assert await reason(settings, mint(fresh_idp, exp=None)) == "missing claim exp"


async def test_unconfigured_issuer_and_non_jwts_are_not_ours(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    assert await verify(settings, mint(fresh_idp, iss="https://other.example.com")) is None
    assert await verify(settings, "alice-token-0123456789abcdef") is None
    assert await verify(settings, "a.b.c") is None


async def test_tampered_payload_fails_signature(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    header, payload, signature = mint(fresh_idp, groups=["dev"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["admins"]
    tampered = f"{header}.{b64(claims)}.{signature}"
    assert await reason(settings, tampered) == "signature verification failed"


async def test_system_groups_and_users_are_refused(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    assert await reason(settings, mint(fresh_idp, groups=["dev", "system:masters"])) == (
        "group 'system:masters' is not allowed"
    )
    bare = new_settings(closing, fresh_idp, claim_mappings={"username": {"prefix": ""}})
    assert (
        await reason(bare, mint(fresh_idp, sub="system:admin")) == "user name 'system:admin' is not allowed"
    )


async def test_required_claims(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp, required_claims={"hd": "example.com"})
    assert await reason(settings, mint(fresh_idp)) == "missing claim hd"
    assert await reason(settings, mint(fresh_idp, hd="evil.com")) == "claim hd must be 'example.com'"
    assert isinstance(await verify(settings, mint(fresh_idp, hd="example.com")), Identity)


def test_config_refuses_weak_algorithms_and_colliding_prefixes(fresh_idp):
    for alg in ("none", "HS256"):
        with pytest.raises(ValidationError, match="not allowed"):
            settings_for(fresh_idp, algorithms=[alg])
    with pytest.raises(ValidationError, match="could collide"):
        OIDCSettings.model_validate(
            {
                "issuers": [
                    {"issuer": "https://a.example.com", "audiences": ["x"], "claim_mappings": {"username": {"prefix": "sso:"}}},
                    {"issuer": "https://b.example.com", "audiences": ["x"], "claim_mappings": {"username": {"prefix": "sso:"}}},
                ]
            }
        )  # fmt: skip
    with pytest.raises(ValidationError, match="https"):
        OIDCSettings.model_validate({"issuers": [{"issuer": "http://idp.example.com", "audiences": ["x"]}]})
    with pytest.raises(ValidationError, match="audience"):
        OIDCSettings.model_validate({"issuers": [{"issuer": "https://idp.example.com"}]})


# -- keys: rotation, unknown kids, caching --------------------------------------------------------------


async def test_unknown_kid_refreshes_once_then_fails(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    keys = settings.verifier.keys[fresh_idp.url]
    clock = [1000.0]
    keys.clock = lambda: clock[0]
    assert isinstance(await verify(settings, mint(fresh_idp)), Identity)
    before = fresh_idp.jwks_requests
    clock[0] += 11  # past the refresh rate limit
    stranger = make_rsa("not-published")
    assert await reason(settings, mint(fresh_idp, stranger)) == "unknown signing key"
    assert fresh_idp.jwks_requests == before + 1
    # within the rate limit, another unknown kid does not fetch again
    assert await reason(settings, mint(fresh_idp, make_rsa("other"))) == "unknown signing key"
    assert fresh_idp.jwks_requests == before + 1


async def test_key_rotation_triggers_exactly_one_refresh(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp)
    keys = settings.verifier.keys[fresh_idp.url]
    clock = [1000.0]
    keys.clock = lambda: clock[0]
    assert isinstance(await verify(settings, mint(fresh_idp)), Identity)
    new_key = make_ec("ec-2")
    fresh_idp.keys = [new_key]
    before = fresh_idp.jwks_requests
    clock[0] += 11
    identity = await verify(settings, mint(fresh_idp, new_key, "ES256", sub="bob"))
    assert isinstance(identity, Identity) and identity.user.endswith("#bob")
    assert fresh_idp.jwks_requests == before + 1
    # the rotated-out key is gone once the set was refreshed
    assert await reason(settings, mint(fresh_idp, sub="carol")) == "unknown signing key"


async def test_burst_of_unknown_kids_shares_one_fetch(fresh_idp, closing):
    settings = new_settings(closing, fresh_idp, jwks_min_refresh_seconds=0)
    assert isinstance(await verify(settings, mint(fresh_idp)), Identity)
    before = fresh_idp.jwks_requests
    stranger = make_rsa("x")
    tokens = [mint(fresh_idp, stranger, header={"kid": uuid.uuid4().hex}) for _ in range(50)]
    answers = await asyncio.gather(*(verify(settings, t) for t in tokens))
    assert all(isinstance(a, AuthFailure) and a.reason == "unknown signing key" for a in answers)
    assert fresh_idp.jwks_requests - before == 1  # single flight, even with no rate limit
    # with the default rate limit, a second burst right after does not fetch at all
    limited = new_settings(closing, fresh_idp)
    assert isinstance(await verify(limited, mint(fresh_idp)), Identity)
    before = fresh_idp.jwks_requests
    answers = await asyncio.gather(*(verify(limited, t) for t in tokens))
    assert all(isinstance(a, AuthFailure) for a in answers)
    assert fresh_idp.jwks_requests - before <= 1


async def test_cache_control_max_age_is_honoured_and_clamped(fresh_idp, closing):
    for header, ttl in (
        ("public, max-age=120", 120),
        ("max-age=1", 60),
        (None, 300),
        ("max-age=999999", 86400),
    ):
        fresh_idp.cache_control = header
        settings = new_settings(closing, fresh_idp)
        keys = settings.verifier.keys[fresh_idp.url]
        clock = [1000.0]
        keys.clock = lambda clock=clock: clock[0]
        assert isinstance(await verify(settings, mint(fresh_idp)), Identity)
        assert keys.expires_at == 1000.0 + ttl
    # once stale, the next (uncached) token refetches
    fresh_idp.cache_control = "max-age=120"
    settings = new_settings(closing, fresh_idp)
    keys = settings.verifier.keys[fresh_idp.url]
    clock = [1000.0]
    keys.clock = lambda: clock[0]
    assert isinstance(await verify(settings, mint(fresh_idp)), Identity)
    before = fresh_idp.jwks_requests
    clock[0] += 60
    assert isinstance(await verify(settings, mint(fresh_idp, sub="b")), Identity)
    assert fresh_idp.jwks_requests == before
    clock[0] += 61
    assert isinstance(await verify(settings, mint(fresh_idp, sub="c")), Identity)
    assert fresh_idp.jwks_requests == before + 1


async def test_unreachable_keys_give_a_clear_reason(fresh_idp, closing):
    from conftest import free_port

    settings = new_settings(closing, fresh_idp, jwks_url=f"http://127.0.0.1:{free_port()}/jwks")
    assert await reason(settings, mint(fresh_idp)) == "cannot fetch the issuer's keys"


# -- GitHub Actions preset ------------------------------------------------------------------------------


async def test_github_actions_preset_maps_groups_by_rule(fresh_idp, closing):
    settings = new_settings(
        closing,
        fresh_idp,
        audiences=[],
        github_actions={
            "audience": "https://gateway.example.com",
            "rules": [
                {"match": {"repository_id": 42, "environment": "prod"}, "groups": ["deployers"]},
                {"match": {"repository_owner_id": "7", "ref": "refs/heads/*"}, "groups": ["ci"]},
            ],
        },
    )
    base = {
        "aud": "https://gateway.example.com",
        "sub": "repo:acme/web:environment:prod",
        "repository": "acme/web",
        "repository_id": "42",
        "repository_owner": "acme",
        "repository_owner_id": "7",
        "ref": "refs/heads/main",
        "environment": "prod",
    }
    identity = await verify(settings, mint(fresh_idp, **base))
    assert isinstance(identity, Identity), identity
    assert identity.user == f"{fresh_idp.url}#repo:acme/web:environment:prod"
    assert identity.groups == ("github-actions", "deployers", "ci")
    assert identity.claims["repository_id"] == "42" and identity.claims["environment"] == "prod"
    # same repository name, different (re-created) repository id: no deployers
    other = await verify(settings, mint(fresh_idp, **{**base, "repository_id": "43", "ref": "refs/tags/v1"}))
    assert isinstance(other, Identity) and other.groups == ("github-actions",)
    assert await reason(settings, mint(fresh_idp, **{**base, "aud": AUDIENCE})) == (
        "wrong audience (expected one of https://gateway.example.com)"
    )


def test_github_actions_preset_defaults_to_github_issuer():
    settings = OIDCSettings.model_validate(
        {
            "issuers": [
                {
                    "github_actions": {
                        "audience": "kg",
                        "rules": [{"match": {"repository_id": 1}, "groups": ["g"]}],
                    }
                }
            ]
        }
    )
    entry = settings.issuers[0]
    assert entry.issuer == "https://token.actions.githubusercontent.com"
    assert entry.audiences == ["kg"]
    assert entry.claim_mappings.username.prefix == "github:"
    with pytest.raises(ValidationError, match="repository_id or repository_owner_id"):
        OIDCSettings.model_validate(
            {
                "issuers": [
                    {
                        "github_actions": {
                            "audience": "kg",
                            "rules": [{"match": {"ref": "x"}, "groups": ["g"]}],
                        }
                    }
                ]
            }
        )
