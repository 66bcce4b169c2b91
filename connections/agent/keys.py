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
