"""SSH keys of the agent tunnel: making ed25519 keys, their SHA256 fingerprints, and the gateway's host key
(a configured file, else one generated once and kept in the database so every replica presents it)."""

from __future__ import annotations

from pathlib import Path

from kubegate.core.db import Database

from . import store
from .settings import AgentGatewaySettings
from .ssh import asyncssh

KEY_ALGORITHM = "ssh-ed25519"


class HostKeyError(Exception):
    """The configured host key cannot be used; the message names the file and why."""


def generate_private_key() -> str:
    """A new ed25519 private key as OpenSSH PEM text."""
    key = asyncssh.generate_private_key(KEY_ALGORITHM)
    return key.export_private_key("openssh").decode()


def public_key_line(key: asyncssh.SSHKey) -> str:
    """The key's public half as one OpenSSH line, ``ssh-ed25519 AAAA...``."""
    return key.export_public_key("openssh").decode().strip()


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:...``, as `ssh-keygen -l` shows it (what agent.yaml pins as ``gateway_host_key``)."""
    return str(key.get_fingerprint("sha256"))


def gateway_host_key(
    settings: AgentGatewaySettings | None, base_dir: Path, database: Database
) -> asyncssh.SSHKey:
    """The key the gateway's SSH listener proves itself with: ``host_key_file`` (relative to `base_dir`, the
    config file's folder) when set, else the database's shared key, made on first use. Synchronous: it
    reads a file or the database (run it in a thread from async code). HostKeyError for an unreadable or
    unusable file."""
    if settings is not None and settings.host_key_file is not None:
        path = settings.host_key_file.expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise HostKeyError(f"cannot read the SSH host key {path}: {exc.strerror or exc}") from None
        try:
            return asyncssh.import_private_key(data)
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
            raise HostKeyError(
                f"{path} is not an unencrypted OpenSSH/PEM private key usable as the SSH host key: {exc}"
            ) from None
    pem = database.call(lambda session: store.load_or_create_host_key(session, generate_private_key))
    return asyncssh.import_private_key(pem)


def tls_certificate(key: asyncssh.SSHKey) -> tuple[bytes, bytes]:
    """A self-signed certificate for `key` and the key itself, both PEM: what the gateway's data links
    present. The agent checks it by the key's SSH fingerprint (the same pin as the SSH host key), not by
    name or issuer, so subject and validity carry nothing."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
    from cryptography.x509.oid import NameOID

    private = serialization.load_pem_private_key(key.export_private_key("pkcs8-pem"), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubegate agent links")])
    now = datetime.datetime.now(datetime.UTC)
    # Ed25519/Ed448 sign without a separate hash; RSA and ECDSA host keys with SHA-256.
    digest = (
        None if isinstance(private, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(private, digest)  # type: ignore[arg-type]
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_fingerprint(der: bytes) -> str:
    """The SSH fingerprint (``SHA256:...``) of the public key in a DER certificate: what the agent compares
    with its pinned ``gateway_host_key`` before it sends anything on a data link."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    public = x509.load_der_x509_certificate(der).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return fingerprint(asyncssh.import_public_key(pem))
