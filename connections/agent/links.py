"""Data links: the fast path of an agent tunnel.

A request on an agent connection needs a byte stream from the gateway to the agent. SSH channels carry one
(hub.Tunnel.open_channel), but asyncssh frames, encrypts and authenticates every SSH packet in Python, which
costs more per request than the whole rest of the tunnel. A data link is a plain TLS connection instead,
opened by the agent (it still only dials out) on the gateway's request:

1. the gateway writes ``{"link": NONCE, "connection": NAME}`` on the agent's ``links`` session — an SSH
   session of the agent's authenticated tunnel, so the nonce goes only to that agent;
2. the agent dials the same address and port as its SSH tunnel (the listener tells TLS from SSH by the first
   byte), checks that the certificate's key is the gateway's pinned host key (``gateway_host_key``, the same
   SSH fingerprint; the certificate is self-signed by that key) and only then sends
   ``KGLINK1 NONCE\\n``;
3. the gateway binds the connection to the request that asked for it, once: a nonce is 192 random bits,
   single use, and lives only while that request waits (at most ``LINK_WAIT_SECONDS``).

From then on the link is exactly what a channel is: aiohttp's HTTP client on the gateway side, the agent's
relay (every check it makes) on the other. A link belongs to its tunnel and is closed with it (revocation,
disconnect). When links cannot be used (an agent without the ``links`` session, or a link that does not
arrive), the tunnel falls back to SSH channels.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .keys import tls_certificate
from .ssh import asyncssh

LINKS_COMMAND = "links"
LINK_GREETING = b"KGLINK1 "
NONCE_BYTES = 24
MAX_GREETING = 64  # the greeting line: KGLINK1, a space, 32 base64url characters, a newline
GREETING_SECONDS = 10.0  # a TLS connection that does not greet (or shake hands) within this is closed
# How long a request waits for its link before it uses an SSH channel instead (and the tunnel stops asking
# for links for LINKS_RETRY_SECONDS). A link normally arrives in one round trip plus a TLS handshake.
LINK_WAIT_SECONDS = 3.0
LINKS_RETRY_SECONDS = 60.0
TLS_FIRST_BYTE = b"\x16"  # a TLS record of type handshake: how the listener tells a link from SSH


class LinkFailed(Exception):
    """A requested link did not arrive; the message says why when the agent told."""


def server_context(host_key: asyncssh.SSHKey) -> ssl.SSLContext:
    """The gateway's TLS context for links: TLS 1.3 with a certificate of the SSH host key."""
    cert_pem, key_pem = tls_certificate(host_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files only: a private temporary folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="kubegate-links-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


def client_context() -> ssl.SSLContext:
    """The agent's TLS context for links. No CA and no name check: the agent compares the certificate's key
    with its pin (keys.certificate_fingerprint) after the handshake and before it sends a byte."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def new_nonce() -> str:
    return secrets.token_urlsafe(NONCE_BYTES)


@dataclass(eq=False)
class PendingLink:
    """A link the gateway asked an agent for, until it arrives."""

    tunnel: Any  # hub.Tunnel
    connection: str
    arrived: asyncio.Future[tuple[asyncio.Transport, bytes]]


class LinkRequests:
    """The links this replica is waiting for, by nonce."""

    def __init__(self) -> None:
        self._pending: dict[str, PendingLink] = {}

    def issue(self, tunnel: Any, connection: str) -> tuple[str, PendingLink]:
        nonce = new_nonce()
        pending = PendingLink(tunnel, connection, asyncio.get_running_loop().create_future())
        self._pending[nonce] = pending
        return nonce, pending

    def drop(self, nonce: str) -> None:
        self._pending.pop(nonce, None)

    def claim(self, nonce: str) -> PendingLink | None:
        """The request waiting for `nonce`, once: a second connection with the same nonce gets None."""
        pending = self._pending.pop(nonce, None)
        if pending is None or pending.arrived.done():
            return None
        return pending

    def fail(self, nonce: str, reason: str) -> None:
        """The agent reported that it could not open the link."""
        pending = self._pending.pop(nonce, None)
        if pending is not None and not pending.arrived.done():
            pending.arrived.set_exception(LinkFailed(reason))


class LinkAcceptor(asyncio.Protocol):
    """The gateway's side of a new link until it greets: reads ``KGLINK1 NONCE\\n`` and hands the connection
    to the request waiting for that nonce; anything else closes it."""

    def __init__(self, requests: LinkRequests):
        self.requests = requests
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TLS transport is not a subclass
        self.timer = asyncio.get_running_loop().call_later(GREETING_SECONDS, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > MAX_GREETING:
                self._refuse()
            return
        if self.timer is not None:
            self.timer.cancel()
        if not line.startswith(LINK_GREETING) or len(line) > MAX_GREETING:
            self._refuse()
            return
        pending = self.requests.claim(line.removeprefix(LINK_GREETING).decode("ascii", "replace"))
        if pending is None:
            self._refuse()
            return
        # Nothing is read until the waiting request has put its own protocol in place.
        self.transport.pause_reading()
        pending.arrived.set_result((self.transport, rest))

    def _refuse(self) -> None:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class CountedLink(asyncio.Protocol):
    """Between a link and aiohttp's protocol: keeps the tunnel's open-channel count and link set."""

    def __init__(self, inner: asyncio.Protocol, tunnel: Any, transport: asyncio.Transport):
        self.inner, self.tunnel, self.transport = inner, tunnel, transport

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.link_closed(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
