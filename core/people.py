"""People behind identities: one person key for every authenticated identity.

One person may hold several credentials — a static token, an OIDC token, a `kubegate login` token — and
each authenticates as its own identity (its own user name, often with an issuer prefix). Promises about
people ("nobody approves their own request", "two different reviewers") must compare people, not user
names, or a second credential of the requester approves the request or counts as a second reviewer.

The gateway-wide `people` section says how an identity's person key is found, first answer wins:

1. `map`: an explicit person → identity patterns list. A pattern is matched, case-insensitively, against
   both ``METHOD:USER`` (e.g. ``static-tokens:alice``, ``login:oidc:https://idp#alice``, ``oidc:…``) and
   the bare user name; ``*`` matches any run of characters, ``?`` one character. A pattern of one person
   that could match an identity another person's pattern matches is refused when the config loads. An
   exchanged gateway token is matched with the method of the credential it was exchanged from.
2. `claims`: the first listed claim the identity carries (kept by its authentication plugin, e.g. the
   `oidc` plugin's `keep_claims`) with a non-empty string value. An ``email`` claim is not used when the
   token says ``email_verified: false``.
3. The user name itself — not qualified by the method, so the same user name through two methods is one
   person (Kubernetes RBAC sees them as one user too). With `user_fallback: false` there is no third
   step: an identity neither the map nor a claim names has no person, and may not review — so a token
   that leaves the claim out (requested without the `email` scope, say) cannot pass for another person.

Keys are compared case-insensitively (Unicode NFKC and case folded): merging two spellings of one name
can only make the approval rules stricter, never let one person pass as two.

The core resolves the person right after authentication (see `ConnectionHooks.authenticate`), so the
data path and the plugins' APIs (reviewers acting through `/api/approvals`) always agree on it.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import deque
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from .flow import Identity

# A glob as tokens: ("*",) any run of characters, ("?",) one character, ("=", c) the character c.
Token = tuple[str, ...]
STAR: Token = ("*",)
ONE: Token = ("?",)
# "Any method, then a colon": what precedes a user name in the METHOD:USER form.
ANY_METHOD_PREFIX: list[Token] = [STAR, ("=", ":")]
MAX_CACHED = 10_000
# A gateway token minted by `POST /login/exchange` is the identity it was exchanged from under another
# method: the login plugin names it `login:exchange` and writes the original method into this claim (its
# own record; it replaces any claim of that name). It is matched as the original, so it is that person:
# matched as `login:exchange:USER`, a pattern could make it a person of its own, who approves the
# requests its owner made with the credential it came from.
EXCHANGED_METHOD = "login:exchange"
EXCHANGED_FROM_CLAIM = "exchanged_from"


def matched_method(identity: Identity) -> str:
    """The method a pattern sees in ``METHOD:USER``: the identity's own, or for an exchanged token the
    method of the credential it was exchanged from."""
    if identity.method == EXCHANGED_METHOD:
        original = identity.claims.get(EXCHANGED_FROM_CLAIM)
        if isinstance(original, str) and original:
            return original
    return identity.method


def normalize(text: str) -> str:
    """The comparable form of a person key, user name or pattern: NFKC, case folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def person_key(identity: Identity) -> str:
    """The identity's person key: the one the core resolved, else (an identity no gateway resolved, e.g.
    built by a tool or a record made before person keys) its normalized user name."""
    return identity.person or normalize(identity.user)


def parse_glob(pattern: str) -> list[Token]:
    """`pattern` (already normalized) as tokens; only ``*`` and ``?`` are wildcards."""
    return [STAR if c == "*" else ONE if c == "?" else ("=", c) for c in pattern]


def glob_regex(tokens: list[Token]) -> re.Pattern[str]:
    parts = [".*" if t == STAR else "." if t == ONE else re.escape(t[1]) for t in tokens]
    return re.compile("".join(parts), re.DOTALL)


def common_match(a: list[Token], b: list[Token]) -> str | None:
    """A string both globs match, or None when there is none (a search over pairs of positions: the
    product of the two patterns' automata)."""
    start = (0, 0)
    seen = {start}
    queue: deque[tuple[tuple[int, int], str]] = deque([(start, "")])
    while queue:
        (i, j), text = queue.popleft()
        if i == len(a) and j == len(b):
            return text
        ta = a[i] if i < len(a) else None
        tb = b[j] if j < len(b) else None
        steps: list[tuple[int, int, str]] = []
        if ta == STAR:
            steps.append((i + 1, j, ""))  # the star matches nothing more
        if tb == STAR:
            steps.append((i, j + 1, ""))
        if ta is not None and tb is not None:
            char_a = None if ta in (STAR, ONE) else ta[1]
            char_b = None if tb in (STAR, ONE) else tb[1]
            # Two different literal characters: no common string goes on from here.
            if char_a is None or char_b is None or char_a == char_b:
                char = char_a or char_b or "x"
                if ta == STAR and tb != STAR:
                    steps.append((i, j + 1, char))  # a's star eats b's character
                elif tb == STAR and ta != STAR:
                    steps.append((i + 1, j, char))
                elif ta != STAR:
                    steps.append((i + 1, j + 1, char))
        for ni, nj, char in steps:
            if (ni, nj) not in seen:
                seen.add((ni, nj))
                queue.append(((ni, nj), text + char))
    return None


def identities_in_common(a: str, b: str) -> str | None:
    """An identity (as the string one of the patterns matches) that both patterns would map, or None.

    Each pattern matches ``METHOD:USER`` or the bare user, so besides a string both match, a pattern may
    match ``METHOD:USER`` while the other matches that USER: checked as ``*:`` before the other pattern.
    """
    ta, tb = parse_glob(normalize(a)), parse_glob(normalize(b))
    return (
        common_match(ta, tb)
        or common_match(ta, ANY_METHOD_PREFIX + tb)
        or common_match(ANY_METHOD_PREFIX + ta, tb)
    )


class PeopleSettings(BaseModel):
    """Gateway-wide: `people`. How an identity's person key is found (see docs/identity.md)."""

    model_config = ConfigDict(extra="forbid")

    map: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Person key → identity patterns, each matched case-insensitively against `METHOD:USER` "
        "and the bare user name (`*` and `?` wildcards), e.g. `alice@example.com: [static-tokens:alice, "
        "'*:https://idp.example.com#alice']`. An exchanged gateway token is matched with the method of the "
        "credential it was exchanged from. Checked first. No identity may be matched by two persons' patterns.",
    )
    claims: list[str] = Field(
        default_factory=list,
        description="Claims that name the person, in order: the first one an identity carries (kept by its "
        "authentication plugin, e.g. `keep_claims: [email]` of `oidc`) with a non-empty string value is the "
        "person key. Checked after `map`; without either, the person is the user name.",
    )

    user_fallback: bool = Field(
        True,
        description="When neither `map` nor `claims` names an identity's person: `true`, the user name is the "
        "person; `false`, the identity has no person and may not review approval requests (fail closed: a "
        "token without the claim cannot pass for another person).",
    )

    @field_validator("map")
    @classmethod
    def _one_person_per_identity(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        persons: dict[str, str] = {}
        for person, patterns in value.items():
            key = normalize(person.strip())
            if not key:
                raise ValueError("a person key must not be empty")
            if key in persons:
                raise ValueError(f"{persons[key]!r} and {person!r} are the same person (keys ignore case)")
            persons[key] = person
            for pattern in patterns:
                if not pattern.strip():
                    raise ValueError(f"{person!r}: an identity pattern must not be empty")
                if "[" in pattern or "]" in pattern:
                    raise ValueError(f"{person!r}: {pattern!r}: only * and ? are wildcards ([...] is not)")
                if normalize(pattern).startswith(EXCHANGED_METHOD + ":"):
                    raise ValueError(
                        f"{person!r}: {pattern!r}: an exchanged token is matched as the identity it was "
                        "exchanged from (e.g. oidc:USER or static-tokens:USER): name that one"
                    )
        entries = [(person, pattern) for person, patterns in value.items() for pattern in patterns]
        for index, (person_a, pattern_a) in enumerate(entries):
            for person_b, pattern_b in entries[index + 1 :]:
                if normalize(person_a.strip()) == normalize(person_b.strip()):
                    continue
                both = identities_in_common(pattern_a, pattern_b)
                if both is not None:
                    raise ValueError(
                        f"{pattern_a!r} of {person_a!r} and {pattern_b!r} of {person_b!r} both match "
                        f"{both!r}: an identity can belong to one person only"
                    )
        return value

    @field_validator("claims")
    @classmethod
    def _claim_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("a claim name must not be empty")
        return value


class PeopleResolver:
    """Finds identities' person keys by a loaded `people` section (one per config load)."""

    def __init__(self, settings: PeopleSettings | None = None):
        self.settings = settings or PeopleSettings()
        self._patterns = [
            (normalize(person.strip()), glob_regex(parse_glob(normalize(pattern))))
            for person, patterns in self.settings.map.items()
            for pattern in patterns
        ]
        self._mapped: dict[tuple[str, str], str | None] = {}

    def person_of(self, identity: Identity) -> str:
        """The person key of `identity`: mapped, else from a claim, else its user name (normalized) — or ""
        (no person) when `user_fallback` is off."""
        mapped = self._from_map(matched_method(identity), identity.user)
        if mapped is not None:
            return mapped
        claimed = self._from_claims(identity.claims)
        if claimed is not None:
            return claimed
        return normalize(identity.user) if self.settings.user_fallback else ""

    def resolve(self, identity: Identity) -> Identity:
        """`identity` with its `person` set (a copy: identities are immutable and plugins may cache them)."""
        return dataclasses.replace(identity, person=self.person_of(identity))

    def _from_map(self, method: str, user: str) -> str | None:
        if not self._patterns:
            return None
        key = (method, user)
        if key in self._mapped:
            return self._mapped[key]
        candidates = (normalize(f"{method}:{user}"), normalize(user))
        found = next(
            (person for person, regex in self._patterns if any(regex.fullmatch(c) for c in candidates)),
            None,
        )
        if len(self._mapped) >= MAX_CACHED:
            self._mapped.clear()
        self._mapped[key] = found
        return found

    def _from_claims(self, claims: dict[str, Any]) -> str | None:
        for name in self.settings.claims:
            value = claims.get(name)
            if name == "email" and claims.get("email_verified") is False:
                continue  # an address the IdP did not verify names nobody
            if isinstance(value, str) and value.strip():
                return normalize(value.strip())
        return None
