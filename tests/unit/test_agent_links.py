"""Data links of the agent tunnel (connections/agent/links.py): the certificate is the SSH host key, a nonce
binds one link to one request once, and a connection that does not greet correctly is dropped."""

from __future__ import annotations

import asyncio

import pytest

from kubegate.connections.agent import keys
from kubegate.connections.agent.links import (
    LINK_GREETING,
    LinkAcceptor,
    LinkFailed,
    LinkRequests,
    new_nonce,
)
from kubegate.connections.agent.ssh import asyncssh


@pytest.mark.parametrize("algorithm", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"])
def test_the_link_certificate_carries_the_host_key_and_its_ssh_fingerprint(algorithm: str):
    key = asyncssh.generate_private_key(algorithm)
    cert_pem, _key_pem = keys.tls_certificate(key)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert keys.certificate_fingerprint(der) == keys.fingerprint(key)
    other = asyncssh.generate_private_key(algorithm)
    assert keys.certificate_fingerprint(der) != keys.fingerprint(other)


def test_nonces_are_unguessable_and_of_one_shape():
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert {len(n) for n in nonces} == {32}


async def test_a_nonce_is_claimed_once_and_a_reported_failure_reaches_the_request():
    requests = LinkRequests()
    nonce, pending = requests.issue(tunnel=None, connection="edge")
    assert requests.claim(nonce) is pending
    assert requests.claim(nonce) is None  # a replay of the same greeting gets nothing
    assert requests.claim(new_nonce()) is None

    nonce, pending = requests.issue(tunnel=None, connection="edge")
    requests.fail(nonce, "cannot reach the gateway")
    with pytest.raises(LinkFailed, match="cannot reach"):
        await pending.arrived
    assert requests.claim(nonce) is None  # a link arriving after the failure is not bound

    nonce, pending = requests.issue(tunnel=None, connection="edge")
    pending.arrived.cancel()  # the request stopped waiting
    assert requests.claim(nonce) is None


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.reading = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False


@pytest.mark.parametrize(
    "greeting",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a stranger speaking HTTP
        LINK_GREETING + b"A" * 32 + b"\n",  # a guessed nonce
        b"KGLINK2 " + b"A" * 32 + b"\n",  # another version
        LINK_GREETING + b"A" * 200,  # a greeting that never ends
    ],
)
async def test_a_connection_without_a_valid_greeting_is_dropped(greeting: bytes):
    requests = LinkRequests()
    _nonce, pending = requests.issue(tunnel=None, connection="edge")
    acceptor = LinkAcceptor(requests)
    transport = FakeTransport()
    acceptor.connection_made(transport)
    for i in range(0, len(greeting), 7):  # in pieces, as TCP may deliver it
        acceptor.data_received(greeting[i : i + 7])
        if transport.aborted:
            break
    assert transport.aborted
    assert not pending.arrived.done()
    acceptor.connection_lost(None)


async def test_the_right_greeting_hands_the_connection_over_with_what_followed_it():
    requests = LinkRequests()
    nonce, pending = requests.issue(tunnel=None, connection="edge")
    acceptor = LinkAcceptor(requests)
    transport = FakeTransport()
    acceptor.connection_made(transport)
    acceptor.data_received(LINK_GREETING + nonce.encode()[:10])
    assert not pending.arrived.done()
    acceptor.data_received(nonce.encode()[10:] + b"\nHTTP/1.1 100")
    handed, rest = await pending.arrived
    assert handed is transport and rest == b"HTTP/1.1 100"
    assert not transport.reading  # paused until the request's own protocol is in place
    assert not transport.aborted

    second = FakeTransport()  # the same greeting again: a replay
    LinkAcceptor(requests).connection_made(second)
    acceptor2 = LinkAcceptor(requests)
    acceptor2.connection_made(second)
    acceptor2.data_received(LINK_GREETING + nonce.encode() + b"\n")
    assert second.aborted


async def test_a_connection_that_does_not_greet_in_time_is_closed(monkeypatch):
    from kubegate.connections.agent import links

    monkeypatch.setattr(links, "GREETING_SECONDS", 0.05)
    acceptor = LinkAcceptor(LinkRequests())
    transport = FakeTransport()
    acceptor.connection_made(transport)
    await asyncio.sleep(0.15)
    assert transport.aborted
