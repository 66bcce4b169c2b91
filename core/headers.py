"""Which headers cross the gateway, and the last check before anything is sent upstream.

The caller's ``Authorization`` and every ``Impersonate-*`` header (kubectl ``--as``/``--as-group`` send
them) must never reach the API server: left in, any caller could act as anyone the gateway may
impersonate, up to ``system:masters``.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from .errors import StatusError
from .flow import INTENT_HEADER, Identity

RESERVED_USER_PREFIX = "kubegate:"

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "http2-settings",
    }
)
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# Headers that speak to the gateway, not to the cluster: read here, never forwarded (the stated intent is
# recorded masked; sent on, it would reach the API server and whatever logs its requests as written).
GATEWAY_ONLY = frozenset({INTENT_HEADER})


# The API server's front-proxy authenticator (`--requestheader-*`) takes the user from these headers when the
# request comes with a client certificate it trusts as a front proxy: should the gateway's credential ever be
# such a certificate, a caller's `X-Remote-User: admin` would be believed. Their default names, stripped always.
FRONT_PROXY_PREFIX = "x-remote-"
# Browsers cannot set Authorization on a WebSocket, so the API server also reads a bearer token from this
# subprotocol (k8s.io/apiserver pkg/authentication/request/websocket): a second credential the caller could
# slip past the gateway on an exec/attach upgrade. Never forwarded.
BEARER_SUBPROTOCOL_PREFIX = "base64url.bearer.authorization.k8s.io."


def is_credential_header(lname: str) -> bool:
    return lname == "authorization" or lname.startswith(("impersonate-", "proxy-", FRONT_PROXY_PREFIX))


def subprotocols_for_upstream(protocols: list[str]) -> list[str]:
    """The client's WebSocket subprotocols minus any that carries a credential."""
    return [p for p in protocols if not p.strip().lower().startswith(BEARER_SUBPROTOCOL_PREFIX)]


def client_headers_for_upstream(
    headers: list[tuple[str, str]], *, websocket: bool = False, keep_length: bool = False
) -> list[tuple[str, str]]:
    """The client's headers minus credentials, impersonation and hop-by-hop headers."""
    listed = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed |= {token.strip().lower() for token in value.split(",")}
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in GATEWAY_ONLY or lname in listed or is_credential_header(lname):
            continue
        if websocket and lname in WEBSOCKET_HANDSHAKE:
            continue
        if lname == "content-length" and not keep_length:
            continue
        out.append((name, value))
    return out


# What cannot go into a header value: control characters (they would end or split it) and unpaired
# surrogates (a JSON "\ud800" escape in a token's claim parses to one; it has no UTF-8 form at all).
_UNWRITABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
# What the API server's HTTP parser drops around a header value (Go's net/textproto: readMIMEHeader's
# TrimLeft(v, " \t") and trim() of the line; the agent's parser, llhttp, does the same).
_HEADER_SPACE = " \t"


def as_read_upstream(value: str) -> str:
    """`value` as the API server reads it back from a header: without leading and trailing spaces and tabs.

    A check on a name the gateway will send as an ``Impersonate-*`` value (``system:``, ``kubegate:``) must
    look at this form: `" system:masters"` arrives as `system:masters`."""
    return value.strip(_HEADER_SPACE)


def names_system_identity(name: str) -> bool:
    """Whether the API server would read `name`, sent as a user or group, as a Kubernetes `system:` one."""
    return as_read_upstream(name).startswith("system:")


def _safe(value: str, what: str) -> str:
    if _UNWRITABLE.search(value):
        # An identity that cannot be written as a header is refused rather than mangled.
        raise StatusError(
            403,
            f"the authenticated {what} contains control characters or unpaired surrogates and cannot be "
            "impersonated",
        )
    if as_read_upstream(value) != value:
        # The API server would act on another name than the one policy, approvals and audit saw (and
        # `" system:masters"` on a system group). Refused, not trimmed: a claim that differs from a name
        # only by spaces is not that name's owner.
        raise StatusError(
            403,
            f"the authenticated {what} {value!r} begins or ends with a space or tab, which the API server "
            "would drop: it cannot be impersonated",
        )
    return value


def impersonation_headers(identity: Identity) -> list[tuple[str, str]]:
    """``Impersonate-*`` headers for the caller: one ``Impersonate-Group`` per group (the API server adds
    ``system:authenticated`` itself), ``Impersonate-Uid`` and ``Impersonate-Extra-<key>`` when known.

    Every value must reach the API server as it is here (`_safe`); the checks on names run on that form."""
    user = _safe(identity.user, "user name")
    if not user:
        # The API server impersonates only a non-empty Impersonate-User (buildImpersonationRequests'
        # `hasUser`): without one the request would run as the gateway's own credential.
        raise StatusError(403, "the authenticated identity has an empty user name and cannot be impersonated")
    if user.startswith(RESERVED_USER_PREFIX):
        # The gateway's own requests on a connection without a gateway credential (an agent connection)
        # act as `kubegate:gateway`; no caller may be that user.
        raise StatusError(403, f"the user name {user!r} is reserved for the gateway itself")
    out = [("Impersonate-User", user)]
    out += [("Impersonate-Group", _safe(group, "group")) for group in identity.groups]
    if identity.uid:
        out.append(("Impersonate-Uid", _safe(identity.uid, "uid")))
    for key, values in identity.extra.items():
        header = "Impersonate-Extra-" + quote(_safe(key, "extra key").lower(), safe="")
        out += [(header, _safe(value, "extra value")) for value in values]
    return out


def check_upstream_headers(
    headers: list[tuple[str, str]], credential: list[tuple[str, str]], impersonation: list[tuple[str, str]]
) -> None:
    """Refuse to send a request where a header that carries identity is not one the gateway set.

    Runs after every plugin had its say, as the last step before the request leaves.
    """
    allowed = {(n.lower(), v) for n, v in credential} | {(n.lower(), v) for n, v in impersonation}
    expected = len(credential) + len(impersonation)
    seen = 0
    for name, value in headers:
        lname = name.lower()
        if is_credential_header(lname):
            if (lname, value) not in allowed:
                raise StatusError(
                    500, f"refusing to send a request carrying an unexpected {name} header upstream"
                )
            seen += 1
    if seen != expected:
        raise StatusError(500, "refusing to send a request whose identity headers were altered")
