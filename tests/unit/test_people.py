"""Person keys (core/people.py): precedence map > claims > user name, case-insensitive keys, a `people.map`
that could give one identity two persons refused at load in one line, the pattern-overlap check exact
(compared with brute force), the core resolving the person at authentication, and the approval service
refusing and counting by person."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest
from kubetest import base_config, run_kubegate
from pydantic import ValidationError

from kubegate.core.flow import Flow, Identity
from kubegate.core.flow import Request as FlowRequest
from kubegate.core.people import (
    PeopleResolver,
    PeopleSettings,
    common_match,
    glob_regex,
    identities_in_common,
    parse_glob,
    person_key,
)
from kubegate.plugins.approvals import store
from kubegate.plugins.approvals.service import ApprovalService, ReviewError

MAP = {
    "alice@example.com": ["static-tokens:alice", "login:*:alice@example.com", "oidc:https://idp#alice"],
    "Bob@Example.com": ["bob"],
}


def resolver(**settings) -> PeopleResolver:
    return PeopleResolver(PeopleSettings.model_validate(settings))


def ident(user: str, method: str = "static-tokens", **claims) -> Identity:
    return Identity(user=user, groups=("reviewers",), method=method, claims=claims)


# -- resolution --------------------------------------------------------------------------------------------


def test_the_map_comes_first_then_claims_then_the_user_name():
    people = resolver(map=MAP, claims=["email", "upn"])
    assert people.person_of(ident("alice")) == "alice@example.com"
    assert people.person_of(ident("oidc:alice@example.com", "login:oidc")) == "alice@example.com"
    # The map wins over a claim that says otherwise.
    assert (
        people.person_of(ident("https://idp#alice", "oidc", email="mallory@example.com"))
        == "alice@example.com"
    )
    # A bare-user pattern matches that user through any method; keys are case-folded.
    assert people.person_of(ident("bob", "oidc")) == "bob@example.com"
    # Not mapped: the first claim present with a string value, case-folded (emails ignore case).
    assert (
        people.person_of(ident("https://idp#carol", "oidc", email="Carol@Example.COM")) == "carol@example.com"
    )
    assert people.person_of(ident("x", "oidc", upn="Dave@corp")) == "dave@corp"
    assert people.person_of(ident("x", "oidc", email=["a@b"], upn="dave@corp")) == "dave@corp"  # not a string
    assert people.person_of(ident("x", "oidc", email="  ", upn="dave@corp")) == "dave@corp"  # empty
    # Neither: the user name itself, not qualified by the method (same user, two methods: one person).
    assert people.person_of(ident("Erin")) == people.person_of(ident("erin", "oidc")) == "erin"


@pytest.mark.parametrize("user_fallback", [True, False])
def test_an_exchanged_token_is_the_person_of_the_identity_it_was_exchanged_from(user_fallback):
    """`/login/exchange` keeps the user and names the original method in `exchanged_from`: a METHOD:USER
    pattern of the original matches the exchanged token too, so it cannot review as a person of its own."""
    people = resolver(map={"alice@example.com": ["static-tokens:alice", "static-tokens:alice-admin"]},
                      user_fallback=user_fallback)  # fmt: skip
    exchanged = ident("alice-admin", "login:exchange", exchanged_from="static-tokens", provider="sandbox")
    assert people.person_of(exchanged) == people.person_of(ident("alice-admin")) == "alice@example.com"
    # Only the exchange's own method reads the claim: a kept IdP claim of that name changes nothing.
    assert (
        people.person_of(ident("alice-admin", "oidc", exchanged_from="static-tokens")) != "alice@example.com"
    )


def test_a_pattern_for_the_exchange_method_is_refused():
    with pytest.raises(ValidationError, match="matched as the identity it was exchanged from"):
        PeopleSettings.model_validate({"map": {"ci": ["LOGIN:Exchange:github:*"]}})


def test_the_documented_map_gives_alice_one_person_through_every_credential():
    """docs/identity.md's `people` example, as written: her static token, her IdP user through `oidc` and
    through `kubegate login`, and gateway tokens exchanged for the first two."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[2] / "docs" / "identity.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if b.startswith("people:"))
    people = PeopleResolver(PeopleSettings.model_validate(yaml.safe_load(block)["people"]))
    user = "https://idp.example.com#alice"
    for identity in [
        ident("alice"),
        ident(user, "oidc"),
        ident(user, "login:oidc"),
        ident("alice", "login:exchange", exchanged_from="static-tokens"),
        ident(user, "login:exchange", exchanged_from="oidc"),
    ]:
        assert people.person_of(identity) == "alice@example.com", identity


def test_an_unverified_email_names_nobody():
    people = resolver(claims=["email"])
    assert people.person_of(ident("u1", "oidc", email="alice@example.com", email_verified=False)) == "u1"
    assert people.person_of(ident("u1", "oidc", email="alice@example.com", email_verified=True)) == (
        "alice@example.com"
    )


def test_patterns_match_case_insensitively_with_star_and_question_mark():
    people = resolver(map={"p": ["login:*:ALICE@example.com", "ci-?"]})
    assert people.person_of(ident("oidc:alice@EXAMPLE.com", "login:oidc")) == "p"
    assert people.person_of(ident("ci-1")) == "p"
    assert people.person_of(ident("ci-12")) == "ci-12"  # ? is one character
    assert people.person_of(ident("Alice@example.com", "oidc")) == "alice@example.com"  # not login:


def test_resolve_sets_the_person_on_a_copy():
    people = resolver(map=MAP)
    original = ident("alice")
    resolved = people.resolve(original)
    assert resolved.person == "alice@example.com" and original.person == ""
    assert person_key(original) == "alice" and person_key(resolved) == "alice@example.com"


# -- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("people_map", "expect"),
    [
        ({"a": ["oidc:*"], "b": ["oidc:bob"]}, "'oidc:*' of 'a' and 'oidc:bob' of 'b' both match 'oidc:bob'"),
        # A bare user of one person and METHOD:USER of another: the identity static-tokens:bob is both.
        ({"a": ["bob"], "b": ["static-tokens:*"]}, "both match"),
        ({"a": ["*:alice"], "b": ["alice"]}, "both match"),
        ({"a": ["ALICE"], "b": ["alice"]}, "both match"),  # case-insensitive
        ({"a": ["x*"], "b": ["*y"]}, "both match 'xy'"),
        ({"Alice": ["a"], "alice": ["b"]}, "are the same person"),
        ({"a": ["[ab]"]}, "only * and ? are wildcards"),
        ({"a": [""]}, "must not be empty"),
    ],
)
def test_a_map_that_could_give_an_identity_two_persons_is_refused_in_one_line(tmp_path, people_map, expect):
    config = base_config(tmp_path)
    config["people"] = {"map": people_map}
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0, line
    assert f"{tmp_path / 'kubegate.yaml'}: people.map: " in line and expect in line, line


def test_people_that_cannot_overlap_load(tmp_path):
    config = base_config(tmp_path)
    config["people"] = {"map": MAP, "claims": ["email"]}
    config["people"]["map"]["alice@example.com"].append("ALICE")  # the same person twice is fine
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 0, proc.stderr
    config["people"]["surprise"] = 1
    proc = run_kubegate(tmp_path, config)
    assert proc.returncode == 2 and "people.surprise: unknown key" in proc.stderr


def test_the_overlap_check_is_exact():
    """For random patterns over a small alphabet: a common string found by brute force means the check
    finds one too, and every witness it gives really matches both patterns."""
    rng = random.Random(13)
    alphabet = "ab:"
    strings = ["".join(p) for n in range(7) for p in itertools.product(alphabet, repeat=n)]
    for _ in range(400):
        a, b = ("".join(rng.choice("ab:*?") for _ in range(rng.randint(1, 5))) for _ in range(2))
        ra, rb = glob_regex(parse_glob(a)), glob_regex(parse_glob(b))
        brute = any(ra.fullmatch(s) and rb.fullmatch(s) for s in strings)
        witness = common_match(parse_glob(a), parse_glob(b))
        if brute:
            assert witness is not None, (a, b)
        if witness is not None:
            assert ra.fullmatch(witness) and rb.fullmatch(witness), (a, b, witness)
    assert identities_in_common("login:*:alice", "login:*:bob") is None
    assert identities_in_common("static-tokens:alice", "alice") == "static-tokens:alice"


def test_settings_errors_name_the_problem():
    with pytest.raises(ValidationError, match="a claim name must not be empty"):
        PeopleSettings.model_validate({"claims": [""]})


# -- the core resolves the person at authentication --------------------------------------------------------


def test_the_connections_of_a_loaded_config_give_every_identity_its_person(tmp_path):
    """What the data path (`_admit`) and the plugins' APIs (`authenticate_caller`) both call."""
    import yaml

    from kubegate.connections.registry import build_registry
    from kubegate.core.attributes import RequestAttributes
    from kubegate.core.config import parse_settings
    from kubegate.core.plugins import PluginHost

    config = base_config(tmp_path)
    config["people"] = {"map": {"alice@example.com": ["static-tokens:alice"]}}
    path = tmp_path / "kubegate.yaml"
    path.write_text(yaml.safe_dump(config))
    connection = build_registry(parse_settings(path), path, PluginHost()).get("prod")
    assert connection is not None
    # base_config's static token for alice is "t" (GOOD_HASH is its SHA-256).
    request = FlowRequest(method="GET", path="/api", query="", headers=[("authorization", "Bearer t")])
    flow = Flow(connection=connection, request=request, attributes=RequestAttributes(path="/api"))
    identity = asyncio.run(connection.hooks.authenticate(flow))
    assert isinstance(identity, Identity) and identity.user == "alice"
    assert identity.person == "alice@example.com"


# -- approvals compare people ------------------------------------------------------------------------------


class _NoDatabase:
    async def run(self, fn):  # pragma: no cover - not used by _check_reviewer
        raise AssertionError


def record(requester: str = "alice", person: str = "alice@example.com", **values) -> store.ApprovalRecord:
    now = time.time()
    return store.ApprovalRecord(id="r1", intent_hash="h", connection="c", requester=requester,
                                requester_person=person, reviewer_groups=["reviewers"], created_at=now,
                                expires_at=now + 60, **values)  # fmt: skip


def test_the_requesters_other_identity_may_not_review():
    people = resolver(map=MAP)
    other = people.resolve(ident("oidc:alice@example.com", "login:oidc"))
    with pytest.raises(ReviewError) as caught:
        ApprovalService._check_reviewer(record(), other)
    assert caught.value.status == 403 and "same person, alice@example.com" in caught.value.message
    bob = people.resolve(ident("bob"))
    ApprovalService._check_reviewer(record(), bob)  # another person may


def test_a_record_made_before_person_keys_compares_user_names_case_insensitively():
    with pytest.raises(ReviewError, match="own request"):
        ApprovalService._check_reviewer(record("Alice", ""), ident("alice", "oidc"))


def test_one_persons_second_identity_is_not_a_second_approval():
    people = resolver(map=MAP)
    first = {"reviewer": "bob", "person": "bob@example.com", "comment": "", "at": 0}
    with pytest.raises(ReviewError) as caught:
        ApprovalService._check_reviewer(record(approvals=[first]), people.resolve(ident("bob", "oidc")))
    assert caught.value.status == 409 and "another reviewer must" in caught.value.message
    # An entry made before person keys: its user name stands for the person.
    legacy = {"reviewer": "Carol", "comment": "", "at": 0}
    with pytest.raises(ReviewError, match="already approved"):
        ApprovalService._check_reviewer(record(approvals=[legacy]), ident("carol", "oidc"))


def test_review_counts_distinct_people(tmp_path):
    from kubegate.core.db import Database

    database = Database(f"sqlite:///{tmp_path / 'k.db'}")
    database.create_tables()
    service = ApprovalService(database, {})
    held = record(min_approvals=2)
    asyncio.run(database.run(lambda s: store.add(s, held)))
    people = resolver(map={"bob@example.com": ["bob", "oidc:https://idp#bob"]})
    bob = people.resolve(ident("bob"))
    updated = asyncio.run(service.review("r1", bob, True, "ok"))
    assert updated.state == store.PENDING and updated.approvals[0]["person"] == "bob@example.com"
    with pytest.raises(ReviewError, match="already approved this request as bob"):
        asyncio.run(service.review("r1", people.resolve(ident("https://idp#bob", "oidc")), True, ""))
    updated = asyncio.run(service.review("r1", people.resolve(ident("carol")), True, ""))
    assert updated.state == store.APPROVED
    assert [a["person"] for a in updated.approvals] == ["bob@example.com", "carol"]
    database.close()


def test_without_the_user_fallback_an_unnamed_identity_has_no_person_and_may_not_review():
    people = resolver(map=MAP, claims=["email"], user_fallback=False)
    assert people.person_of(ident("carol")) == ""
    assert people.person_of(ident("carol", "oidc", email="carol@example.com")) == "carol@example.com"
    nobody = people.resolve(ident("https://idp#mallory", "oidc"))
    with pytest.raises(ReviewError) as caught:
        ApprovalService._check_reviewer(record(), nobody, people)
    assert caught.value.status == 403 and "has no person key" in caught.value.message
    ApprovalService._check_reviewer(record(), people.resolve(ident("bob")), people)


def test_an_exchanged_approval_is_found_again_as_the_identity_it_came_from():
    # Approved through a gateway token exchanged from the static alice-admin, before the reload that
    # linked alice-admin and alice-ops: alice-ops is the same person, not a second reviewer.
    entry = {"reviewer": "alice-admin", "person": "alice-admin", "method": "login:exchange",
             "exchanged_from": "static-tokens", "comment": "", "at": 0}  # fmt: skip
    now_linked = resolver(map={"alice@example.com": ["static-tokens:alice-admin", "static-tokens:alice-ops"]})
    held = record("bob", "bob", min_approvals=2, approvals=[entry])
    with pytest.raises(ReviewError, match="already approved this request as alice-admin"):
        ApprovalService._check_reviewer(held, now_linked.resolve(ident("alice-ops")), now_linked)


def test_a_people_section_changed_since_the_request_was_held_cannot_split_the_requester():
    # Held while alice's identities were not linked: the record says person "alice".
    held = record("alice", "alice", requester_method="static-tokens")
    now_linked = resolver(map=MAP)
    other_alice = now_linked.resolve(ident("https://idp#alice", "oidc"))
    with pytest.raises(ReviewError, match=r"same person, alice@example\.com"):
        ApprovalService._check_reviewer(held, other_alice, now_linked)
    # The same for an approval given before the link: the approver's other identity is refused.
    earlier = {"reviewer": "alice", "person": "alice", "method": "static-tokens", "comment": "", "at": 0}
    with pytest.raises(ReviewError, match="already approved this request as alice"):
        ApprovalService._check_reviewer(record("rita", "rita", approvals=[earlier]), other_alice, now_linked)
