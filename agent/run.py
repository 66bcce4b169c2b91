"""The agent process: enrol once, then keep one SSH tunnel to every gateway replica and serve the
connections of agent.yaml through each.

Every address each ``gateways`` entry resolves to is dialed (a headless Service name gives every replica),
re-resolved every 30 s. A tunnel that drops is dialed again with exponential backoff and jitter (1 s, 2 s, …,
``max_backoff_seconds``). The gateway's host key is pinned by fingerprint: an agent never talks to a
gateway it was not told about, and never sends its key's signature to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubegate.connections.agent.channels import CHANNEL_MAX_PACKET, ChannelSession
from kubegate.connections.agent.hub import ENCRYPTION_ALGS, ENROL_COMMAND, JOIN_USER, PATH_PREFIX
from kubegate.connections.agent.keys import certificate_fingerprint
from kubegate.connections.agent.links import LINK_GREETING, LINK_WAIT_SECONDS, LINKS_COMMAND, client_context
from kubegate.connections.agent.ssh import asyncssh
from kubegate.connections.agent.store import JOIN_TOKEN_SHAPE

from .config import AgentSettings, cluster_upstreams
from .forward import RequestLog
from .relay import Forwarder

log = logging.getLogger("kubegate.agent")

RESOLVE_EVERY_SECONDS = 30.0
NONCE_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")


class AgentError(Exception):
    """A problem the agent cannot get past by retrying (one line for the operator)."""


def agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kubegate-agent_{version('kubegate')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "kubegate-agent_dev"


def generate_identity(path: Path) -> asyncssh.SSHKey:
    """A new Ed25519 key written to `path` (mode 0600), refusing to overwrite one."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="kubegate-agent")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AgentError(f"{path}: an identity already exists; not overwriting it") from None
    except OSError as exc:
        raise AgentError(f"{path}: cannot write the identity: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    return key


def load_identity(path: Path) -> asyncssh.SSHKey | None:
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        return None
    except (OSError, asyncssh.KeyImportError) as exc:
        raise AgentError(f"{path}: not a usable private key ({exc})") from None


class _PinnedGateway(asyncssh.SSHClient):
    """Accepts exactly the host key with the pinned fingerprint."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        presented = key.get_fingerprint("sha256")
        if presented != self.fingerprint:
            # Named here: asyncssh's own error says only "Host key is not trusted", not which key it saw.
            log.error("gateway %s:%s presented host key %s, not the pinned gateway_host_key %s: not trusted",
                      addr, port, presented, self.fingerprint)  # fmt: skip
            return False
        return True


def _ssh_options(settings: AgentSettings) -> dict[str, Any]:
    return {
        # Empty trusted lists: every host key goes to validate_host_public_key (the pin).
        "known_hosts": ([], [], []),
        "client_version": agent_version(),
        "encryption_algs": ENCRYPTION_ALGS,
        "compression_algs": ["none"],
        "keepalive_interval": 15,
        "keepalive_count_max": 3,
        "agent_path": None,
        "config": (),
        "connect_timeout": 10,
    }


@dataclass
class Agent:
    settings: AgentSettings
    config_path: Path
    join_token: str | None = None
    forwarders: dict[str, Forwarder] = field(default_factory=dict)
    _dialers: dict[tuple[str, int], asyncio.Task[None]] = field(default_factory=dict)
    _link_tls: ssl.SSLContext = field(default_factory=client_context)

    async def run(self) -> None:
        upstreams = cluster_upstreams(self.settings, self.config_path)
        requests = RequestLog(self.settings.audit_log, self.settings.log_format == "json")
        for name, upstream in upstreams.items():
            await upstream.start()
            self.forwarders[name] = Forwarder(
                name, upstream, self.settings.allow_system_impersonation, requests
            )
        try:
            key = await self._identity()
            log.info("agent %s serving %s; dialing %s", self.settings.name, ", ".join(self.forwarders),
                     ", ".join(self.settings.gateways))  # fmt: skip
            while True:
                await self._dial_every_address(key)
                await asyncio.sleep(RESOLVE_EVERY_SECONDS)
        finally:
            for task in self._dialers.values():
                task.cancel()
            for task in self._dialers.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for forwarder in self.forwarders.values():
                await forwarder.upstream.close()
            requests.close()

    # -- identity and enrolment --
    async def _identity(self) -> asyncssh.SSHKey:
        """This agent's key, enrolled with a gateway when it is not yet (retrying until a gateway answers)."""
        key = load_identity(self.settings.identity_file)
        token = self.join_token
        if token is None and self.settings.join_token_file is not None:
            with contextlib.suppress(FileNotFoundError):
                token = self.settings.join_token_file.read_text().strip() or None
        if key is None and token is None:
            raise AgentError(
                f"{self.settings.identity_file}: no identity yet; give a join token (--join-token or "
                "join_token_file) from `kubegate agents join-token`"
            )
        if token is None:
            assert key is not None
            return key
        if not JOIN_TOKEN_SHAPE.match(token):
            raise AgentError(
                "the join token is malformed (expected kgj_… as `kubegate agents join-token` prints)"
            )
        backoff = 1.0
        while True:
            host, port = _first_address(self.settings.gateways)
            try:
                if key is not None and await self._key_accepted(host, port, key):
                    return key  # already enrolled (a restart): the token is not needed any more
                if key is None:
                    key = generate_identity(self.settings.identity_file)
                await self._enrol(host, port, key, token)
                return key
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                what = (
                    "does not prove the pinned host key"
                    if isinstance(exc, asyncssh.HostKeyNotVerifiable)
                    else "cannot be reached"
                )
                log.warning("gateway %s:%s %s to enrol: %s; retrying in %.0f s", host, port, what,
                            _why(exc), backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff_seconds)

    async def _key_accepted(self, host: str, port: int, key: asyncssh.SSHKey) -> bool:
        try:
            conn = await asyncssh.connect(
                host, port, username=self.settings.name, client_keys=[key], password=None,
                client_factory=lambda: _PinnedGateway(self.settings.gateway_host_key), **_ssh_options(self.settings),
            )  # fmt: skip
        except asyncssh.PermissionDenied:
            return False
        conn.close()
        return True

    async def _enrol(self, host: str, port: int, key: asyncssh.SSHKey, token: str) -> None:
        try:
            conn = await asyncssh.connect(
                host, port, username=JOIN_USER, password=token, client_keys=None,
                client_factory=lambda: _PinnedGateway(self.settings.gateway_host_key), **_ssh_options(self.settings),
            )  # fmt: skip
        except asyncssh.PermissionDenied:
            raise AgentError(
                "the gateway refused the join token (unknown, expired or already used)"
            ) from None
        async with conn:
            request = {"name": self.settings.name,
                       "public_key": key.export_public_key("openssh").decode().strip(),
                       "version": agent_version()}  # fmt: skip
            result = await conn.run(ENROL_COMMAND, input=json.dumps(request), check=False, timeout=30)
        try:
            answer = json.loads(str(result.stdout or "{}"))
        except ValueError:
            answer = {}
        if result.exit_status != 0:
            raise AgentError(f"enrolment refused: {answer.get('error') or 'no reason given'}")
        log.info("enrolled as %s for %s", answer.get("agent"), ", ".join(answer.get("connections", [])))
        missing = sorted(set(self.forwarders) - set(answer.get("connections", [])))
        if missing:
            log.warning("not enrolled for %s: the gateway will refuse them", ", ".join(missing))

    # -- tunnels --
    async def _dial_every_address(self, key: asyncssh.SSHKey) -> None:
        wanted: set[tuple[str, int]] = set()
        for entry in self.settings.gateways:
            host, port = _split(entry)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
                wanted |= {(str(info[4][0]), port) for info in infos}
            except OSError as exc:
                log.warning("cannot resolve %s: %s", host, exc)
                wanted |= {a for a in self._dialers if a[1] == port}  # keep dialing what we had
        for address in set(self._dialers) - wanted:
            self._dialers.pop(address).cancel()
        for address in wanted - set(self._dialers):
            self._dialers[address] = asyncio.create_task(self._tunnel_forever(address, key))

    async def _tunnel_forever(self, address: tuple[str, int], key: asyncssh.SSHKey) -> None:
        host, port = address
        backoff = 1.0
        while True:
            try:
                conn = await asyncssh.connect(
                    host, port, username=self.settings.name, client_keys=[key], password=None,
                    client_factory=lambda: _PinnedGateway(self.settings.gateway_host_key),
                    **_ssh_options(self.settings),
                )  # fmt: skip
                async with conn:
                    served = []
                    for name, forwarder in self.forwarders.items():
                        try:
                            await conn.create_unix_server(
                                _session_factory(forwarder),
                                PATH_PREFIX + name,
                                max_pktsize=CHANNEL_MAX_PACKET,
                            )
                            served.append(name)
                        except asyncssh.ChannelListenError:
                            log.error("gateway %s:%s refused to let this agent serve %s (not enrolled for it)",
                                      host, port, name)  # fmt: skip
                    if not served:
                        raise AgentError("the gateway let this agent serve none of its connections")
                    log.info("tunnel to %s:%s up, serving %s", host, port, ", ".join(served))
                    backoff = 1.0
                    links = asyncio.create_task(self._serve_links(conn, host, port))
                    try:
                        await conn.wait_closed()
                    finally:
                        links.cancel()
                log.warning("tunnel to %s:%s closed; reconnecting", host, port)
            except asyncio.CancelledError:
                raise
            except asyncssh.PermissionDenied:
                log.error("gateway %s:%s refused this agent's identity (revoked or not enrolled)", host, port)
            except (OSError, asyncssh.Error, TimeoutError, AgentError) as exc:
                log.warning("tunnel to %s:%s: %s", host, port, _why(exc))
            delay = backoff * random.uniform(0.8, 1.2)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self.settings.max_backoff_seconds)

    # -- data links --
    async def _serve_links(self, conn: asyncssh.SSHClientConnection, host: str, port: int) -> None:
        """The `links` session: open a data link for every one the gateway asks for (links.py)."""
        try:
            process = await conn.create_process(LINKS_COMMAND)
        except (asyncssh.Error, OSError) as exc:
            log.info("gateway %s:%s offers no data links (%s): SSH channels only", host, port, _why(exc))
            return
        dials: set[asyncio.Task[None]] = set()
        try:
            while line := await process.stdout.readline():
                try:
                    request = json.loads(line)
                    nonce, connection = str(request["link"]), str(request["connection"])
                except (ValueError, TypeError, KeyError):
                    log.info(
                        "gateway %s:%s: no data links (%s): SSH channels only", host, port, line.strip()[:200]
                    )
                    continue
                task = asyncio.create_task(self._open_link(host, port, nonce, connection, process.stdin))
                dials.add(task)
                task.add_done_callback(dials.discard)
        except (asyncssh.Error, OSError):
            pass  # the tunnel went down: _tunnel_forever reconnects
        finally:
            for task in dials:
                task.cancel()

    async def _open_link(
        self, host: str, port: int, nonce: str, connection: str, report: asyncssh.SSHWriter[str]
    ) -> None:
        def fail(reason: str) -> None:
            with contextlib.suppress(Exception):
                report.write(json.dumps({"link": nonce, "error": reason}) + "\n")

        forwarder = self.forwarders.get(connection)
        if forwarder is None or not NONCE_SHAPE.fullmatch(nonce):
            fail(f"this agent does not serve connection {connection!r}" if forwarder is None else "bad nonce")
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LINK_WAIT_SECONDS):
                transport, _ = await loop.create_connection(asyncio.Protocol, host, port, ssl=self._link_tls)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning("data link to %s:%s failed: %s", host, port, _why(exc))
            fail(f"the agent cannot open a TLS connection to {host}:{port}: {_why(exc)}")
            return
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            presented = certificate_fingerprint(der) if der else "no certificate"
        except Exception:  # not a key the pin could name
            presented = "an unreadable certificate"
        if presented != self.settings.gateway_host_key:
            transport.abort()
            log.error("data link to %s:%s presented %s, not the pinned gateway_host_key %s: not trusted",
                      host, port, presented, self.settings.gateway_host_key)  # fmt: skip
            fail("the link's certificate is not the pinned host key")
            return
        # The pin holds: only now does the nonce leave the agent. Then the link is a relay like a channel.
        transport.write(LINK_GREETING + nonce.encode("ascii") + b"\n")
        relay = forwarder.server()
        transport.set_protocol(relay)
        relay.connection_made(transport)


def _session_factory(forwarder: Forwarder) -> Any:
    def make() -> ChannelSession:
        return ChannelSession(forwarder.server(), {"peername": ("gateway", 0)})

    return make


def _split(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def _first_address(gateways: list[str]) -> tuple[str, int]:
    return _split(gateways[0])


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc or type(exc).__name__)
