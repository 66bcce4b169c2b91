"""Masking text: known secret values (raw, base64, URL-encoded) and secret-shaped patterns.

Patterns come from detect-secrets' maintained detectors (AWS keys, private keys, JWTs, basic-auth URLs,
Slack/GitHub/Stripe… tokens) plus `KEY=VALUE` assignments of password-like keys and custom regexes from
the config. Known values are the Secrets the gateway has seen (see `known.py`): they catch what no pattern
can, like a plain `hunter2` printed by `echo $DB_PASSWORD`.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote

import ahocorasick

from . import scanner
from .forms import FormSet, KnownForms

# detect-secrets plugins whose regexes apply to free text (the keyword/entropy ones need file context).
DETECTORS = {
    "aws": "detect_secrets.plugins.aws.AWSKeyDetector",
    "private-key": "detect_secrets.plugins.private_key.PrivateKeyDetector",
    "jwt": "",  # detect-secrets' JWT regex ends lazily (it validates afterwards): ours takes all three parts
    "basic-auth": "detect_secrets.plugins.basic_auth.BasicAuthDetector",
    "github": "detect_secrets.plugins.github_token.GitHubTokenDetector",
    "slack": "detect_secrets.plugins.slack.SlackDetector",
    "stripe": "detect_secrets.plugins.stripe.StripeDetector",
    "gitlab": "detect_secrets.plugins.gitlab_token.GitLabTokenDetector",
    "openai": "detect_secrets.plugins.openai.OpenAIDetector",
}
# KEY=VALUE / KEY: VALUE where KEY names a secret; the value is masked, the key kept. Found from the
# keyword's position (located with the hint automaton below): the rest of the key, the separator, the value.
ASSIGNMENT_KEYWORDS = ("password", "passwd", "pwd", "secret", "token", "apikey", "api_key", "accesskey",
                       "access_key", "privatekey", "private_key", "credential")  # fmt: skip
# Line-local (`[ \t]*`, not `\s*`): a key at the end of one line and a value on the next are not an
# assignment, so what is masked does not depend on where a stream's chunks fall (see stream.py).
ASSIGNMENT_TAIL = re.compile(r"[A-Za-z0-9_.-]*?([ \t]*[=:][ \t]*)([\"']?)([^\s\"',;&]{4,})")
ASSIGNMENT = re.compile(  # the same rule as one regex, for reference and tests
    r"(?i)((?:PASSWORD|PASSWD|PWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL)[A-Z0-9_.-]*?)"
    r"([ \t]*[=:][ \t]*)([\"']?)([^\s\"',;&]{4,})"
)
# Well-known variables whose values are not secrets although their names hold a keyword of the name rules
# (the assignment keywords above, `env_names`): every POSIX shell sets PWD and OLDPWD to directories
# (`kubectl exec -- env` prints them), and OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR name where the public CA
# certificates are. Exact, case-sensitive whole names: `DB_PWD`, `PWD_FILE` or `pwd` are still masked. The
# trade-off: a secret put into one of these names (`PWD=hunter2`) is shown, unless another rule (a known
# value, a detector) catches it. The `non_secret_names` setting replaces this list.
DEFAULT_NON_SECRET_NAMES = ("PWD", "OLDPWD", "SSL_CERT_FILE", "SSL_CERT_DIR")
# The characters of a name around an assignment's keyword (as in ASSIGNMENT's key).
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
NAME_BYTES = frozenset(ord(char) for char in NAME_CHARS)


def assignment_name(text: str, keyword_start: int, key_end: int) -> str:
    """The whole name of an assignment whose keyword starts at `keyword_start` and whose key ends at
    `key_end` (the separator): `OLDPWD` for the `PWD` found in `OLDPWD=/tmp`."""
    start = keyword_start
    while start > 0 and text[start - 1] in NAME_CHARS:
        start -= 1
    return text[start:key_end]


def _skip_non_secret(names: frozenset[bytes]) -> Callable[[bytes, re.Match[bytes]], bool]:
    """For the scanner: whether an ASSIGNMENT match (bytes) is an assignment to one of `names`."""

    def skip(data: bytes, match: re.Match[bytes]) -> bool:
        start = match.start(1)
        while start > 0 and data[start - 1] in NAME_BYTES:
            start -= 1
        return data[start : match.end(1)] in names

    return skip


# A cheap test per chunk before a detector's regex runs: the text must contain one of these (lower case).
PREFILTER = {
    "aws": ("akia", "asia", "abia", "acca", "a3t", "aws"),
    "private-key": ("private key", "putty-user-key"),
    "jwt": ("eyj",),
    "basic-auth": ("://",),
    "github": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    "slack": ("xox", "hooks.slack.com"),
    "stripe": ("k_live_",),
    "gitlab": (
        "glpat-",
        "gldt-",
        "glft-",
        "glsoat-",
        "glrt-",
        "gr1348941",
        "glcbt-",
        "glimt-",
        "glptt-",
        "glagent-",
        "gloas-",
    ),
    "openai": ("t3blbkfj",),
}

# What Hyperscan looks for to find an assignment: its start and the first characters of the value (a report
# per possible end would otherwise come for every character of a long value).
ASSIGNMENT_SCAN = ASSIGNMENT.pattern.replace("{4,})", "{4})")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


Detector = tuple[tuple[str, ...], re.Pattern[str]]  # (prefilter substrings, lower case; regex)
# Detectors whose one capture group is the secret itself (basic-auth: the password of a URL; aws: the key
# after its name): only the group is masked. Elsewhere a group is just a prefix (GitHub's `(ghp|gho…)_`)
# and the whole match is masked.
SECRET_GROUP_DETECTORS = ("basic-auth", "aws")
SECRET_GROUP_PATTERNS: set[str] = set()


def masked_group(pattern: re.Pattern[str]) -> int:
    """Which group of a match is masked: 1 for the detectors above, else the whole match."""
    return 1 if pattern.pattern in SECRET_GROUP_PATTERNS and pattern.groups == 1 else 0


def detector_patterns(names: Iterable[str]) -> list[Detector]:
    import importlib

    patterns: list[Detector] = []
    for name in names:
        if name == "jwt":
            patterns.append((PREFILTER[name], JWT))
            continue
        module_name, _, class_name = DETECTORS[name].rpartition(".")
        detector = getattr(importlib.import_module(module_name), class_name)
        for pattern in getattr(detector, "denylist", ()):
            compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
            if name in SECRET_GROUP_DETECTORS and compiled.groups == 1:
                SECRET_GROUP_PATTERNS.add(compiled.pattern)
            patterns.append((PREFILTER[name], compiled))
    return patterns


def custom_patterns(regexes: Iterable[str]) -> list[Detector]:
    return [((), re.compile(regex)) for regex in regexes]


def value_forms(value: str) -> set[str]:
    """How a secret value may show up in text: as is, base64 (plain and URL-safe), URL-encoded."""
    raw = value.encode()
    forms = {
        value,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        quote(value, safe=""),
    }
    # base64 of the value inside a longer base64 text starts at a 3-byte boundary: also the unpadded forms
    forms |= {f.rstrip("=") for f in list(forms) if f.endswith("=")}
    return {f for f in forms if f}


@functools.lru_cache(maxsize=32)
def scanner_for(
    patterns: tuple[Detector, ...],
    assignments: bool,
    marker: str,
    non_secret_names: frozenset[str] = frozenset(),
) -> scanner.PatternScanner:
    """One compiled scanner per set of patterns, shared by the maskers rebuilt when known values change."""
    if not scanner.available():
        raise RuntimeError("the hyperscan package is not installed")
    skip = _skip_non_secret(frozenset(n.encode() for n in non_secret_names)) if non_secret_names else None
    regexes = [scanner.Pattern(ASSIGNMENT, group=4, skip=skip)] if assignments else []
    scan_forms = {0: ASSIGNMENT_SCAN} if assignments else {}
    regexes += [scanner.Pattern(pattern, masked_group(pattern)) for _, pattern in patterns]
    return scanner.PatternScanner(regexes, marker, scan_forms)


class TextMasker:
    """Masks one string at a time. Immutable: a new one is built when the known values change."""

    def __init__(self, marker: str, known: Iterable[str] = (), patterns: Iterable[Detector] = (),
                 assignments: bool = True, engine: str = "auto", known_forms: KnownForms | None = None,
                 non_secret_names: Iterable[str] = ()):  # fmt: skip
        """`known`: values, whose forms are indexed here; or `known_forms`, already indexed (the masking
        plugin keeps them in parts so that a Secret event does not rebuild them all, see forms.py).
        `non_secret_names`: exact names the assignment rule leaves alone (DEFAULT_NON_SECRET_NAMES)."""
        self.marker = marker
        self.non_secret_names = frozenset(non_secret_names)
        if known_forms is None:
            # Aho-Corasick: one pass over the text whatever the number of values (a regex alternation of
            # thousands of literals is orders of magnitude slower).
            known_forms = KnownForms([FormSet.build({f for value in known for f in value_forms(value)})])
        self.known: KnownForms | None = known_forms if known_forms else None
        self.longest = known_forms.longest
        # Patterns without hints (custom regexes) run over all text; the others only where a hint is.
        self.always = [pattern for hints, pattern in patterns if not hints]
        self.patterns = [(hints, pattern) for hints, pattern in patterns if hints]
        self.assignments = assignments
        # One pass finds which detectors can match at all (their hint substrings) and where keywords are.
        self.keywords = set(ASSIGNMENT_KEYWORDS) if assignments else set()
        self.hint_automaton = ahocorasick.Automaton()
        for hint in {h for hints, _ in self.patterns for h in hints} | self.keywords:
            self.hint_automaton.add_word(hint, hint)
        if len(self.hint_automaton):
            self.hint_automaton.make_automaton()
        else:
            self.hint_automaton.add_word("\x00never", "\x00never")
            self.hint_automaton.make_automaton()
        # The compiled scanner when there is one (engine "auto"); "python" keeps the hint-gated regexes.
        use_scanner = engine == "hyperscan" or (engine == "auto" and scanner.available())
        self.scanner = (
            scanner_for(tuple(patterns), assignments, marker, self.non_secret_names) if use_scanner else None
        )

    def mask(self, text: str) -> str:
        if self.known is not None:
            text = self._mask_known(text)
        if self.scanner is not None:
            data = text.encode("utf-8", "surrogateescape")
            spans = self.scanner.spans(data)
            if spans:
                text = scanner.replace_spans(data, spans, self.scanner.marker).decode(
                    "utf-8", "surrogateescape"
                )
            for leftover in self.scanner.leftover:
                text = leftover.regex.sub(self._whole_or_group, text)
            return text
        for regex in self.always:
            text = regex.sub(self._whole_or_group, text)
        if not self.patterns and not self.assignments:
            return text
        # One pass of the hint automaton finds the lines that can hold a pattern or an assignment; only
        # those lines go through the regexes (most log lines never do).
        hits = list(self.hint_automaton.iter(text.lower()))
        if not hits:
            return text
        lines: list[tuple[int, int]] = []
        for end, _ in hits:
            if lines and lines[-1][0] <= end < lines[-1][1]:
                continue
            start = text.rfind("\n", 0, end) + 1
            stop = text.find("\n", end)
            lines.append((start, len(text) if stop < 0 else stop))
        if sum(stop - start for start, stop in lines) > len(text) // 4:
            # Most of it (or one long line, such as a JSON document): one pass over all, with these hits.
            found = {hint for _, hint in hits}
            ends = [end for end, hint in hits if hint in self.keywords]
            if ends:
                text = self._mask_assignments(text, ends)
            return self._detect(text, found)
        parts, position = [], 0
        for start, stop in lines:
            parts += [text[position:start], self._mask_line(text[start:stop])]
            position = stop
        parts.append(text[position:])
        return "".join(parts)

    def _detect(self, text: str, found: set[str]) -> str:
        for hints, pattern in self.patterns:
            if any(h in found for h in hints):
                text = pattern.sub(self._whole_or_group, text)
        return text

    def _mask_line(self, line: str) -> str:
        hits = list(self.hint_automaton.iter(line.lower()))
        ends = [end for end, hint in hits if hint in self.keywords]
        if ends:
            line = self._mask_assignments(line, ends)
        return self._detect(line, {hint for _, hint in hits})

    def _mask_assignments(self, text: str, keyword_ends: list[int]) -> str:
        spans: list[tuple[int, int]] = []
        for end in keyword_ends:
            match = ASSIGNMENT_TAIL.match(text, end + 1)
            if match and not text.startswith(self.marker, match.start(3)):
                if (
                    self.non_secret_names
                    and assignment_name(text, end, match.start(1)) in self.non_secret_names
                ):
                    continue
                spans.append(match.span(3))
        if not spans:
            return text
        parts, position = [], 0
        for start, stop in sorted(set(spans)):
            if start < position:
                continue
            parts += [text[position:start], self.marker]
            position = stop
        parts.append(text[position:])
        return "".join(parts)

    def assignment_spans(self, text: str) -> list[tuple[int, int]]:
        """The values the assignment rule masks in `text` (as `mask` without a scanner), for stream.py."""
        spans: list[tuple[int, int]] = []
        position = 0
        while match := ASSIGNMENT.search(text, position):
            if self.non_secret_names and (
                assignment_name(text, match.start(1), match.end(1)) in self.non_secret_names
            ):
                # Not this one; its value may hold an assignment of its own (`PWD=x;PASSWORD=y`).
                position = match.start(1) + 1
                continue
            spans.append(match.span(4))
            position = match.end()
        return spans

    def _mask_known(self, text: str) -> str:
        assert self.known is not None
        parts: list[str] = []
        position = 0
        for start, end in self.known.spans(text):
            if start < position:
                continue
            parts += [text[position:start], self.marker]
            position = end
        if not parts:
            return text
        parts.append(text[position:])
        return "".join(parts)

    def _whole_or_group(self, match: re.Match[str]) -> str:
        if masked_group(match.re) and match.group(1):
            start, end = match.span(1)
            whole = match.group(0)
            offset = match.start(0)
            return whole[: start - offset] + self.marker + whole[end - offset :]
        return self.marker

    def mask_bytes(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        masked = self.mask(text)
        return data if masked == text else masked.encode("utf-8", "surrogateescape")
