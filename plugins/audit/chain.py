"""The hash chain over audit records, optional signatures, and the check that finds where it breaks.

Each record is canonical JSON (sorted keys, no spaces, UTF-8) and carries its position `seq`; its hash is
SHA-256 over the previous record's hash and its own canonical text, so a record cannot be changed, removed,
added or moved without breaking the chain at that point. With a key kept outside the store, each hash is
also signed (HMAC-SHA256, or Ed25519 whose public key is enough to verify): without the key a rewritten
tail cannot be re-chained unnoticed. See docs/audit.md for the threat model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> str:
    """The text a record is chained and stored as: JSON with sorted keys, no spaces, UTF-8.

    orjson writes it (a tenth of the stdlib's time: a third of the audit writer's CPU was this). Where orjson
    cannot (an integer beyond 64 bits, a key that is not a string, nesting deeper than 254), the stdlib's
    form is written, as every record was before; for plain JSON content the two are the same text except for
    floats below 1e-4 (`0.00001` against `1e-05`), which `verify` accepts in either form. Text that UTF-8
    cannot carry (a lone surrogate, which a JSON `\\ud800` escape parses to) has it replaced by U+FFFD: a
    record that could never be written would stop every record queued behind it."""
    try:
        return orjson.dumps(record, default=str, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError
        text = stdlib_canonical(record)
        try:
            text.encode()
        except UnicodeEncodeError:
            text = stdlib_canonical(_without_surrogates(record))
        return text


def stdlib_canonical(record: Any) -> str:
    """The canonical text as the stdlib writes it: every record before orjson wrote them, and the fallback."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def is_canonical(content: Any, text: str) -> bool:
    """Whether `text` is exactly a canonical form of `content` (parsed from it): no duplicate keys, spaces or
    escapes a reader could take differently from the hash's text."""
    try:
        if orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode() == text:
            return True
    except TypeError:
        pass
    return stdlib_canonical(content) == text


def text_for_hash(content: Any, prev_hash: str, chain_hash: str) -> str:
    """The canonical text of parsed `content` that the chain hash was computed over (a store that keeps
    records as parsed JSON, like the audit file, has no text of its own): orjson's form, or the stdlib's when
    only that one matches (records written before orjson wrote them). Neither matching is `verify`'s
    "modified"."""
    text = canonical(content)
    if link(prev_hash, text) != chain_hash:
        older = stdlib_canonical(content)
        if older != text and link(prev_hash, older) == chain_hash:
            return older
    return text


def _without_surrogates(value: Any) -> Any:
    """`value` as plain JSON data, with lone surrogates in its strings (and keys) replaced by U+FFFD."""
    plain = json.loads(json.dumps(value, default=str))  # values of other types as the canonical form has them
    return _replace_surrogates(plain)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(key): _replace_surrogates(item) for key, item in value.items()}
    return value


def link(prev_hash: str, canonical_text: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical_text}".encode()).hexdigest()


class Signer:
    """Signs and checks chain hashes with a key read from a file outside the store."""

    def __init__(self, algorithm: Literal["hmac-sha256", "ed25519"], key: bytes):
        self.algorithm = algorithm
        self.key = key  # as read, so that the audit-db writer process can make the same signer
        self._hmac_key = b""
        self._private: Ed25519PrivateKey | None = None
        self._public: Ed25519PublicKey | None = None
        if algorithm == "hmac-sha256":
            self._hmac_key = key.strip()
            if len(self._hmac_key) < 16:
                raise ValueError("an HMAC key needs at least 16 bytes")
            return
        loaded: Any
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            try:
                loaded = serialization.load_pem_public_key(key)
            except ValueError:
                raise ValueError("not a PEM Ed25519 private or public key") from None
        if isinstance(loaded, Ed25519PrivateKey):
            self._private, self._public = loaded, loaded.public_key()
        elif isinstance(loaded, Ed25519PublicKey):
            self._public = loaded  # verify only
        else:
            raise ValueError("the key is not an Ed25519 key")

    @classmethod
    def from_file(cls, algorithm: Literal["hmac-sha256", "ed25519"], path: Path) -> Signer:
        try:
            return cls(algorithm, path.read_bytes())
        except OSError as exc:
            raise ValueError(f"cannot read the signing key {path}: {exc.strerror}") from None

    @property
    def can_sign(self) -> bool:
        return bool(self._hmac_key) or self._private is not None

    def sign(self, chain_hash: str) -> str:
        if self._hmac_key:
            return hmac.new(self._hmac_key, chain_hash.encode(), hashlib.sha256).hexdigest()
        if self._private is None:
            raise ValueError("this key can only verify")
        return base64.b64encode(self._private.sign(chain_hash.encode())).decode()

    def verify(self, chain_hash: str, signature: str) -> bool:
        if not signature:
            return False
        if self._hmac_key:
            return hmac.compare_digest(self.sign(chain_hash), signature)
        assert self._public is not None
        try:
            self._public.verify(base64.b64decode(signature), chain_hash.encode())
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass
class Stored:
    """A record as read back from a store: its position, canonical text and chain fields."""

    seq: int
    text: str  # the canonical record as written
    prev_hash: str
    hash: str
    signature: str = ""
    columns: dict[str, Any] | None = None  # searchable copies of fields, which must agree with the text
    malformed: str = ""  # why the store's own form of the record is not as written (an audit file's line)


@dataclass
class Problem:
    seq: int
    what: Literal["modified", "deleted", "inserted", "reordered", "unsigned", "truncated"]
    detail: str

    def __str__(self) -> str:
        return f"record {self.seq}: {self.what}: {self.detail}"


def verify(records: Iterable[Stored], signer: Signer | None = None, *, head: tuple[int, str] | None = None,
           trust_first: bool = False, derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
           ) -> tuple[int, Problem | None]:  # fmt: skip
    """Walk the records in the order the store keeps them (by `seq`); return how many were checked and the
    first problem (None: intact).

    `head` is the (seq, hash) the store recorded as its last write: records cut from the end show there.
    `trust_first` starts from the first record's own `prev_hash` (a rotated-away file came before it).
    `derive` computes a record's searchable columns from its content, to compare with `Stored.columns`."""
    expected_seq: int | None = None
    expected_prev = GENESIS
    checked = 0
    for record in records:
        if expected_seq is None:
            expected_seq = record.seq if trust_first else 1
            expected_prev = record.prev_hash if trust_first else GENESIS
        if record.malformed:
            return checked, Problem(record.seq, "modified", record.malformed)
        try:
            content = json.loads(record.text)
        except ValueError:
            return checked, Problem(record.seq, "modified", "its content is not the JSON that was written")
        written_seq = content.get("seq") if isinstance(content, dict) else None
        if link(record.prev_hash, record.text) != record.hash:
            return checked, Problem(record.seq, "modified", "its content does not match its hash")
        if not is_canonical(content, record.text):
            # The hashed text, but a reader may take it differently (a duplicate key: first or last wins).
            return checked, Problem(
                record.seq,
                "modified",
                "its text is not canonical JSON (a duplicate key, a space or an escape)",
            )
        if written_seq != record.seq:
            return checked, Problem(
                record.seq,
                "reordered",
                f"it was written as record {written_seq} and now stands at {record.seq}",
            )
        if record.columns is not None and derive is not None:
            derived = derive(content)
            for key, value in record.columns.items():
                if derived.get(key) != value:
                    return checked, Problem(record.seq, "modified", f"its column {key!r} was changed")
        if record.seq < expected_seq:
            return checked, Problem(record.seq, "inserted", f"a second record {record.seq}")
        if record.seq > expected_seq:
            missing = (
                f"record {expected_seq}"
                if record.seq == expected_seq + 1
                else f"records {expected_seq}-{record.seq - 1}"
            )
            return checked, Problem(expected_seq, "deleted", f"{missing} missing")
        if record.prev_hash != expected_prev:
            return checked, Problem(
                record.seq,
                "inserted",
                f"it does not follow record {record.seq - 1} (a record was replaced, inserted or re-chained)",
            )
        if signer is not None and not signer.verify(record.hash, record.signature):
            return checked, Problem(
                record.seq, "unsigned", "its signature is missing or does not match the key"
            )
        checked += 1
        expected_seq, expected_prev = record.seq + 1, record.hash
    if head is not None and head[0] > 0:
        last_seq = (expected_seq or 1) - 1
        if head[0] > last_seq:
            return checked, Problem(last_seq + 1, "truncated", f"the store wrote up to record {head[0]}")
        if head[0] == last_seq and head[1] != expected_prev:
            return checked, Problem(last_seq, "modified", "the last record differs from the one written last")
    return checked, None
