"""The `masking` plugin's settings (one section per connection, docs/configuration.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import scanner
from .text import DEFAULT_NON_SECRET_NAMES, DETECTORS

PLUGIN_NAME = "masking"
NON_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_ENV_NAMES = ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "PRIVATE", "AUTH", "CERT"]


class ConfigMapKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespaces: str = "*"
    names: str = "*"
    keys: list[str] = Field(min_length=1, description="Key globs whose values are masked.")


class KnownValues(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    namespaces: list[str] = Field(default_factory=list, description="Whose Secrets to learn; default all.")
    min_length: int = Field(6, ge=1, le=1024, description="Shorter values (in characters) are not learned.")
    max_values: int = Field(10_000, ge=1, le=1_000_000)
    max_value_bytes: int = Field(
        4096, ge=16, le=1 << 20, description="Longer values (in bytes) are not learned."
    )
    on_failure: Literal["closed", "open"] = Field(
        "closed",
        description="`closed`: while the gateway cannot follow the Secrets (no RBAC to list and watch them, "
        "a failed list, more than max_values values), requests on the connection get 503 and /readyz says "
        "why; `open`: requests go on, masked by structure, patterns and the values learned so far.",
    )


class Exempt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class MaskingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    marker: str = Field(
        "<masked by kubegate>",
        min_length=1,
        description="What replaces a secret value (no quotes, backslashes or control characters: it is written "
        "into JSON text).",
    )
    env_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENV_NAMES),
        description="Regexes (case-insensitive, searched) for env var names whose `value` is masked.",
    )
    non_secret_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NON_SECRET_NAMES),
        description="Exact, case-sensitive variable names whose values the name rules (`env_names`, "
        "`assignments`) leave alone: well-known non-secrets such as PWD. Known values and detectors still "
        "apply to their values.",
    )
    configmap_keys: list[ConfigMapKeys] = Field(default_factory=list)
    detectors: list[str] = Field(default_factory=lambda: list(DETECTORS))
    assignments: bool = Field(True, description="Mask VALUE in `PASSWORD=VALUE`-style text.")
    patterns: list[str] = Field(default_factory=list, description="Extra regexes; each match is masked.")
    known_values: KnownValues = Field(default_factory=lambda: KnownValues())
    on_unparsable: Literal["refuse", "redact"] = Field(
        "refuse", description="A response that cannot be masked: 502 Status, or its body replaced."
    )
    exempt: Exempt = Field(default_factory=lambda: Exempt())
    max_body_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest JSON response masked.")
    engine: Literal["auto", "hyperscan", "python"] = Field(
        "auto",
        description="How patterns are found: one Hyperscan pass (`auto` when the package is installed), or "
        "Python regexes around hint words (slower; the only choice where Hyperscan has no wheel).",
    )
    exec_hold_ms: int = Field(
        30, ge=1, le=2000, description="Longest exec/attach output is held back to join a split secret."
    )
    exec_hold_from: int = Field(
        1,
        ge=1,
        le=16,
        description="exec/attach output holds a possible secret from this many characters on. 1 (default): "
        "from its first character, so no part of a secret split across frames goes out; the echo of a typed "
        "character that may begin a secret then waits up to exec_hold_ms. 4: keystroke echo is never held, "
        "and up to 3 first characters of a secret split right there may go out (the rest is masked).",
    )
    max_secret_bytes: int = Field(
        16 * 1024,
        ge=256,
        le=16 * 1024 * 1024,
        description="Longest text a stream (logs, exec/attach output) holds back while a secret may be in "
        "progress (at least the longest known value form); a match still open at this length is replaced by "
        "the marker and the rest of it, up to the next whitespace or quote, is not sent.",
    )

    @field_validator("marker")
    @classmethod
    def _marker(cls, marker: str) -> str:
        # The marker is written into JSON text by the value pass: a quote, backslash or control character
        # could end a string early and change the document's structure.
        if any(char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F for char in marker):
            raise ValueError("the marker may not contain quotes, backslashes or control characters")
        return marker

    @field_validator("detectors")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in DETECTORS:
                raise ValueError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
        return names

    @field_validator("engine")
    @classmethod
    def _engine(cls, engine: str) -> str:
        if engine == "hyperscan" and not scanner.available():
            raise ValueError("engine 'hyperscan' needs the hyperscan package, which is not installed")
        return engine

    @field_validator("non_secret_names")
    @classmethod
    def _plain_names(cls, names: list[str]) -> list[str]:
        # Whole names, not patterns: `.*` or `DB_*` here would switch the name rules off wholesale.
        for name in names:
            if not NON_SECRET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, '_'; no patterns)")
        return names

    @field_validator("patterns", "env_names")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns
