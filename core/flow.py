"""The flow: one object that carries a request through every hook.

Per-request state lives here (never in module globals): the parsed attributes, the authenticated identity,
the decision, the headers sent upstream, the response, and a `state` dict that plugins key by their name.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from .attributes import RequestAttributes
from .errors import StatusError

if TYPE_CHECKING:
    from .connections import Connection


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as an authentication plugin established it.

    `user` and `groups` become `Impersonate-User` / `Impersonate-Group`; `uid` and `extra` become
    `Impersonate-Uid` / `Impersonate-Extra-*` when set. `method` names the plugin that authenticated
    (e.g. `static-tokens`), for audit and policy.
    """

    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    method: str = ""
    # Where the identity came from, for policy and audit: the token issuer (OIDC `iss`), claims an
    # authentication plugin chose to keep (e.g. a CI job's repository and environment), and when the
    # credential expires (Unix time), if it does.
    issuer: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    # The person behind the identity (core/people.py), set by the core right after authentication: one
    # person's identities through several methods share it, so approvals compare people, not user names.
    person: str = ""


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """An authentication plugin recognised the credential as its own and rejected it (e.g. expired)."""

    reason: str


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """What a "needs approval" decision asks of the approval plugin: who may approve, how many, for how long
    the request waits, and what an approval grants (`once`: this request; `window`: the rule's requests by
    the same identity for `window_seconds`)."""

    reviewer_groups: tuple[str, ...]
    min_approvals: int = 1
    ttl_seconds: int = 900
    scope: str = "once"
    window_seconds: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a decision plugin. The strictest answer wins: deny > needs_approval > allow."""

    verdict: Verdict
    reason: str = ""
    rule: str = ""
    plugin: str = ""
    approval: ApprovalSpec | None = None  # with NEEDS_APPROVAL

    @classmethod
    def allow(cls, reason: str = "", rule: str = "") -> Decision:
        return cls(Verdict.ALLOW, reason, rule)

    @classmethod
    def deny(cls, reason: str, rule: str = "") -> Decision:
        return cls(Verdict.DENY, reason, rule)


class BodyTransformer(Protocol):
    """Transforms a response body as it streams (see the `kubegate_response_stream` hook).

    `feed` gets each chunk as it arrives and returns what to send now (possibly b"", keeping state for
    data split across chunks); `end` is called once after the last chunk and returns any remaining bytes.
    """

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


@dataclass(slots=True)
class Request:
    """The client's request as the gateway received it (connection-relative path)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    scheme: str = "https"
    client_addr: str = ""
    websocket: bool = False
    subprotocols: list[str] = field(default_factory=list)
    body: bytes | None = None
    # What the gateway saw of the body as it passed (read whole or streamed): for audit records.
    body_size: int = 0
    body_sha256: str = ""
    body_sample: bytes | None = None  # the whole body when it is at most `limits.audit_body_bytes`
    # The query string as the client sent it; `query` is the canonical re-encoding forwarded upstream.
    raw_query: str = ""
    _body_reader: Callable[[], Awaitable[bytes]] | None = None
    _disconnect_waiter: Callable[[], Awaitable[None]] | None = None
    # `headers` by lower-cased name, built at the first lookup: a request is asked for a header some 30
    # times, and a head of 86,000 one-letter headers (1 MiB, as the API server takes) cost 3 ms a scan.
    _by_name: dict[str, list[str]] | None = None

    def _index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        self._by_name = index
        return index

    def header(self, name: str, default: str = "") -> str:
        """The first value of header `name` (any case), or `default`."""
        values = (self._by_name or self._index()).get(name.lower())
        return values[0] if values else default

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (any case), in order."""
        return list((self._by_name or self._index()).get(name.lower(), ()))

    @property
    def user_agent(self) -> str:
        return self.header("user-agent")

    @property
    def bearer_token(self) -> str | None:
        """The token of an `Authorization: Bearer TOKEN` header, or None (no header, another scheme, or more
        than one Authorization header: which one counts could differ between hops, so none does)."""
        values = self.header_values("authorization")
        if len(values) != 1:
            return None
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

    async def read_body(self) -> bytes:
        """Buffer the whole request body (up to the connection's byte cap) and return it.

        Plugins that need the body (policy on the request object, approval hashes) call this; when nobody
        does, the body streams to the API server without being buffered.
        """
        if self.body is None:
            self.body = await self._body_reader() if self._body_reader else b""
        return self.body

    async def wait_disconnected(self) -> None:
        """Return once the client has gone away: for plugins that hold a request (approvals) and must stop
        waiting for a client that left. Buffers a REST request's body first."""
        if not self.websocket:
            await self.read_body()
        if self._disconnect_waiter is None:
            await asyncio.Event().wait()  # not wired (a flow built by a tool): never
        else:
            await self._disconnect_waiter()


@dataclass(slots=True)
class Response:
    """The response being sent to the client. Plugins may edit headers in `kubegate_response_headers`."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    bytes_sent: int = 0


@dataclass(slots=True)
class Flow:
    """One client request on its way through the gateway."""

    connection: Connection
    request: Request
    attributes: RequestAttributes
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    wall_time: float = field(default_factory=time.time)
    identity: Identity | None = None
    auth_failure: str = ""
    decision: Decision | None = None
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    response: Response = field(default_factory=Response)
    error: StatusError | None = None
    # Set by a plugin that masks what this flow sends the client (the response, a session's output): the
    # built-in masking plugin, unless the caller is exempt. A recording stores such output as relayed and
    # masks any other output itself (kubegate_record_stream), so False is always the safe reading.
    output_masked: bool = False
    # The caller's stated reason (`Kubegate-Intent`, see `stated_intent`): shown to reviewers and recorded,
    # never an input to a decision.
    intent: str = ""
    # Per-plugin, per-request state: plugins use their own name as key.
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def kubectl_command(self) -> str:
        return self.request.header("kubectl-command")

    @property
    def kubectl_session(self) -> str:
        return self.request.header("kubectl-session")

    @property
    def latency_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000


class FrameDirection(StrEnum):
    CLIENT_TO_UPSTREAM = "client_to_upstream"
    UPSTREAM_TO_CLIENT = "upstream_to_client"


@dataclass(slots=True)
class Frame:
    """One WebSocket message of an exec/attach/port-forward session.

    For the channel protocols the first byte of `data` is the channel (0 stdin, 1 stdout, 2 stderr,
    3 status, 4 resize; v5 adds `0xFF <channel>` close frames). A plugin may replace `data`, or set
    `drop` to swallow the frame.
    """

    direction: FrameDirection
    data: bytes
    text: bool = False
    drop: bool = False
    # Frames (whole, channel byte included) to send before this one: what a plugin held back from earlier
    # frames goes out ahead of a later frame of another channel (exit status, say).
    before: list[bytes] = field(default_factory=list)
    # Not a message from the peer but a timer tick (see `Session.flush_after`), or the end of the stream:
    # `data` starts empty; a plugin holding data back puts it there (with its channel byte).
    flush: bool = False

    @property
    def channel(self) -> int | None:
        return self.data[0] if self.data and not self.text else None


@dataclass(slots=True)
class Session:
    """An exec/attach/port-forward session relayed over WebSocket."""

    flow: Flow
    subprotocol: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    bytes_from_client: int = 0
    bytes_from_upstream: int = 0
    close_code: int | None = None
    # A plugin that holds back output (to catch a secret split across frames) sets this: after that many
    # seconds without another frame from upstream, the hooks get a `flush` frame to send what they hold.
    flush_after: float | None = None
    # Per-plugin state for the session's lifetime, by plugin name.
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AuditEvent:
    """A structured record of something the gateway did, handed to every `kubegate_audit_event` hook."""

    kind: str
    flow_id: str
    connection: str
    time: float
    data: dict[str, Any]
    # Unique per event and the same in every sink, so records from two sinks can be matched (and a
    # receiver can drop a batch delivered twice).
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# A caller may say why it sends a request (MCP tools always do): shown to reviewers, kept in audit events.
INTENT_HEADER = "kubegate-intent"
MAX_INTENT_CHARS = 1000


def stated_intent(request: Request) -> str:
    """The request's `Kubegate-Intent`: UTF-8, percent-encoded (plain ASCII passes as it is), at most
    `MAX_INTENT_CHARS` characters once decoded. Sent twice, or too long, the request is refused (400): a
    record must never show one reason while another was sent."""
    values = request.header_values(INTENT_HEADER)
    if not values:
        return ""
    if len(values) > 1:
        raise StatusError(400, "the request has more than one Kubegate-Intent header")
    if len(values[0]) > 3 * MAX_INTENT_CHARS:  # bounded before decoding
        raise StatusError(400, f"the Kubegate-Intent header is longer than {MAX_INTENT_CHARS} characters")
    try:
        text = urllib.parse.unquote(values[0].encode("latin-1").decode("utf-8"), errors="strict")
    except UnicodeError:
        raise StatusError(400, "the Kubegate-Intent header is not percent-encoded UTF-8") from None
    if len(text) > MAX_INTENT_CHARS:
        raise StatusError(400, f"the Kubegate-Intent header is longer than {MAX_INTENT_CHARS} characters")
    # Control characters (a forged second line in a log or a chat message) become spaces.
    return "".join(" " if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c for c in text).strip()


def token_fingerprint(token: str) -> str:
    """A stable, non-reversible name for a credential: safe to log and to store."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


BodyStream = AsyncIterator[bytes]
