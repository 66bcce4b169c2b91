"""Masking text: known secret values (raw, base64, URL-encoded) and secret-shaped patterns.

Patterns come from detect-secrets' maintained detectors (AWS keys, private keys, JWTs, basic-auth URLs,
Slack/GitHub/Stripe… tokens) plus `KEY=VALUE` assignments of password-like keys and custom regexes from
the config. Known values are the Secrets the gateway has seen (see `known.py`): they catch what no pattern
can, like a plain `hunter2` printed by `echo $DB_PASSWORD`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote

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
# KEY=VALUE / KEY: VALUE where KEY names a secret; the value is masked, the key kept.
ASSIGNMENT = re.compile(
    r"(?i)\b([A-Z0-9_.-]*(?:PASSWORD|PASSWD|PWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL)S?[A-Z0-9_.-]*)"
    r"(\s*[=:]\s*)([\"']?)([^\s\"',;&]{4,})"
)


JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def detector_patterns(names: Iterable[str]) -> list[re.Pattern[str]]:
    import importlib

    patterns: list[re.Pattern[str]] = []
    for name in names:
        if name == "jwt":
            patterns.append(JWT)
            continue
        module_name, _, class_name = DETECTORS[name].rpartition(".")
        detector = getattr(importlib.import_module(module_name), class_name)
        for pattern in getattr(detector, "denylist", ()):
            patterns.append(pattern if isinstance(pattern, re.Pattern) else re.compile(pattern))
    return patterns


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


class TextMasker:
    """Masks one string at a time. Immutable: a new one is built when the known values change."""

    def __init__(self, marker: str, known: Iterable[str] = (), patterns: Iterable[re.Pattern[str]] = (),
                 assignments: bool = True):  # fmt: skip
        self.marker = marker
        forms = sorted({f for value in known for f in value_forms(value)}, key=len, reverse=True)
        self.longest = max((len(f) for f in forms), default=0)
        self.known = re.compile("|".join(re.escape(f) for f in forms)) if forms else None
        self.patterns = list(patterns)
        self.assignments = assignments

    def mask(self, text: str) -> str:
        if self.known is not None:
            text = self.known.sub(self.marker, text)
        for pattern in self.patterns:
            text = pattern.sub(self._whole_or_group, text)
        if self.assignments:
            text = ASSIGNMENT.sub(self._assignment, text)
        return text

    def _whole_or_group(self, match: re.Match[str]) -> str:
        # detect-secrets' basic-auth regex captures the password only: mask that group, keep the URL.
        if match.re.groups and match.group(1) and match.re.groups == 1:
            start, end = match.span(1)
            whole = match.group(0)
            offset = match.start(0)
            return whole[: start - offset] + self.marker + whole[end - offset :]
        return self.marker

    def _assignment(self, match: re.Match[str]) -> str:
        if match.group(4) == self.marker or self.marker in match.group(4):
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}{match.group(3)}{self.marker}"

    def mask_bytes(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        masked = self.mask(text)
        return data if masked == text else masked.encode("utf-8", "surrogateescape")


class LineCarry:
    """Masks a text stream (`logs -f`) chunk by chunk without letting a secret through when a chunk boundary
    splits it: complete lines go out at once; an unfinished line waits for its end, up to `limit` bytes,
    after which all but a secret's length of it goes out."""

    def __init__(self, masker: TextMasker, limit: int = 64 * 1024):
        self.masker, self.limit = masker, limit
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > self.limit:
            cut = len(data) - max(self.masker.longest, 256)
        self.pending = data[cut:]
        return self.masker.mask_bytes(data[:cut]) if cut else b""

    def end(self) -> bytes:
        out, self.pending = self.masker.mask_bytes(self.pending), b""
        return out
