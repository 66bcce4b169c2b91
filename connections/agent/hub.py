"""The gateway's end of the agent tunnels: an SSH server that agents dial out to.

An agent logs in either with a join token (SSH user ``kubegate-join``, password = token) to enrol its public
key, or with that key (SSH user = the agent's name). A logged-in agent asks, for each connection it serves,
to "listen" on the stream-local path ``kubegate/CONNECTION``; the gateway allows only the connections the
agent was enrolled for. Each upstream HTTP connection (aiohttp's pool keeps them open across requests) is
then a data link (links.py: a TLS connection the agent opens on request, on this same port) or, when links
cannot be used, an SSH channel. Nothing else is allowed: no shell, no TCP forwarding in either direction, no
session but the enrolment command and an agent's ``links`` session.

One hub per process, shared by the gateway objects a SIGHUP reload creates (the listener outlives a reload,
so tunnels do too); ``plugins.agents.listen`` changes take effect at a restart, like ``listen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubegate.core.db import Database

from . import store
from .channels import CHANNEL_MAX_PACKET, ChannelSession
from .links import (
    LINKS_COMMAND,
    LINKS_RETRY_SECONDS,
    TLS_FIRST_BYTE,
    CountedLink,
    LinkAcceptor,
    LinkFailed,
    LinkRequests,
)
from .ssh import asyncssh

log = logging.getLogger("kubegate.agents")

JOIN_USER = "kubegate-join"
PATH_PREFIX = "kubegate/"
ENROL_COMMAND = "enroll"
MAX_ENROL_REQUEST = 16 * 1024
# SSH algorithms: AES-GCM runs in OpenSSL (the cryptography package) at memory speed on any CPU with AES
# instructions; ChaCha20 is the fallback for those without. No compression: API traffic is mostly small.
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
MAX_FIRST_CHANNEL_ATTEMPTS = 20
# A new connection that has not spoken within this is taken for SSH (whose server may speak first); a TLS
# client always speaks first.
SNIFF_SECONDS = 3.0
LISTEN_BACKLOG = 1024  # a burst of links (1,000 watches at once) queues here, not in refused connections


class NoAgent(Exception):
    """No agent that may serve the connection has a tunnel to this replica."""


@dataclass(eq=False)
class Tunnel:
    """One agent's SSH connection to this replica."""

    agent: str
    fingerprint: str
    enrolled_for: frozenset[str]
    conn: asyncssh.SSHServerConnection
    peer: str
    version: str
    since: float = field(default_factory=time.time)
    serving: set[str] = field(default_factory=set)
    session_id: str = ""
    channels_open: int = 0
    channels_total: int = 0
    listening: set[str] = field(default_factory=set)  # connections a channel has opened for
    link_requests: LinkRequests | None = None  # the hub's, while links are enabled
    control: Any = None  # the agent's `links` session (an SSHWriter), once it opened one
    link_transports: set[asyncio.Transport] = field(default_factory=set)
    links_paused_until: float = 0.0

    def links_usable(self) -> bool:
        return (
            self.control is not None
            and self.link_requests is not None
            and time.monotonic() >= self.links_paused_until
        )

    async def open_link(self, connection: str, protocol: asyncio.Protocol) -> None:
        """Ask the agent for a data link for `connection` and connect `protocol` to it (LinkFailed when the
        agent reports it cannot; the caller bounds the wait)."""
        control, requests = self.control, self.link_requests
        if control is None or requests is None:
            raise LinkFailed("the agent has no links session")
        nonce, pending = requests.issue(self, connection)
        try:
            control.write(json.dumps({"link": nonce, "connection": connection}) + "\n")
            try:
                transport, rest = await pending.arrived
            except asyncio.CancelledError:
                # Arrived just as the wait ended: nobody will use it.
                arrived = pending.arrived
                if arrived.done() and not arrived.cancelled() and arrived.exception() is None:
                    arrived.result()[0].abort()
                raise
        finally:
            requests.drop(nonce)
        self.channels_open += 1
        self.channels_total += 1
        self.link_transports.add(transport)
        transport.set_protocol(CountedLink(protocol, self, transport))
        protocol.connection_made(transport)
        if rest:
            protocol.data_received(rest)
        transport.resume_reading()

    def link_closed(self, transport: asyncio.Transport) -> None:
        if transport in self.link_transports:
            self.link_transports.discard(transport)
            self.channels_open -= 1

    def pause_links(self, reason: str) -> None:
        """Use SSH channels for a while: a link did not arrive."""
        self.links_paused_until = time.monotonic() + LINKS_RETRY_SECONDS
        log.warning("agent %s: no data link (%s); using SSH channels for %.0f s", self.agent, reason,
                    LINKS_RETRY_SECONDS)  # fmt: skip

    def close(self) -> None:
        self.conn.close()
        for transport in list(self.link_transports):
            transport.abort()

    async def open_channel(self, connection: str, protocol: asyncio.Protocol) -> None:
        """Open a channel to the agent for `connection` and connect `protocol` to it."""
        session = ChannelSession(protocol, {"peername": (f"agent:{self.agent}", 0)})
        self.channels_open += 1
        self.channels_total += 1
        try:
            for attempt in itertools.count():
                try:
                    await self.conn.create_unix_connection(
                        lambda: _Counted(session, self),
                        PATH_PREFIX + connection,
                        max_pktsize=CHANNEL_MAX_PACKET,
                    )
                    break
                except asyncssh.ChannelOpenError:
                    # The agent sets its listener up when our answer to its request reaches it: a channel
                    # opened in that round trip is refused ("No such listener"). Until one has opened for
                    # the connection, that is what a refusal means, so try again for up to a second.
                    if connection in self.listening or attempt >= MAX_FIRST_CHANNEL_ATTEMPTS:
                        raise
                    await asyncio.sleep(0.05)
            self.listening.add(connection)
        except BaseException:
            self.channels_open -= 1
            raise


class _Counted(asyncssh.SSHUNIXSession[bytes]):
    """Delegates to a ChannelSession and keeps the tunnel's open-channel count (metrics, `agents list`)."""

    def __init__(self, inner: ChannelSession, tunnel: Tunnel):
        self.inner, self.tunnel = inner, tunnel

    def connection_made(self, chan: Any) -> None:
        self.inner.connection_made(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.channels_open -= 1
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Hub:
    """The SSH listener and the tunnels of every agent connected to this replica."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        host_key: asyncssh.SSHKey,
        database: Database,
        replica: str,
        heartbeat_seconds: float,
        links: bool = True,
    ):
        self.host, self.port = host, port
        self.host_key = host_key
        self.links_enabled = links
        self.link_requests = LinkRequests()
        self._link_tls: Any = None  # ssl.SSLContext, made at start when links are enabled
        self.database = database
        self.replica = replica
        self.heartbeat_seconds = heartbeat_seconds
        self.tunnels: dict[str, list[Tunnel]] = {}  # connection name -> tunnels serving it
        self._all: set[Tunnel] = set()
        self._round_robin = itertools.count()
        self._sockets: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()  # accept loops and connections being sniffed
        self._ssh_options: asyncssh.SSHServerConnectionOptions | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.users = 0  # gateways (one per config load) using this hub

    # -- lifecycle --
    async def start(self) -> None:
        self._ssh_options = asyncssh.SSHServerConnectionOptions(
            server_factory=lambda: _AgentLogin(self),
            server_host_keys=[self.host_key],
            keepalive_interval=self.heartbeat_seconds,
            keepalive_count_max=3,
            encryption_algs=ENCRYPTION_ALGS,
            compression_algs=["none"],
            login_timeout=30,
            # No agent forwarding, X11 or TCP forwarding, and no sessions but enrolment and links.
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
        )
        if self.links_enabled:
            from .links import server_context

            try:
                self._link_tls = await asyncio.to_thread(server_context, self.host_key)
            except Exception as exc:  # e.g. a host key type TLS has no certificates for (DSA)
                log.warning("agent data links disabled (SSH channels only): the host key cannot make a "
                            "TLS certificate: %s", exc)  # fmt: skip
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
                if self.port == 0 and self._sockets:  # one port for every address
                    address = (address[0], self.port, *address[2:])
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError:
                sock.close()
                self._close_sockets()
                raise
            self._sockets.append(sock)
            if self.port == 0:
                self.port = sock.getsockname()[1]
        for sock in self._sockets:
            self._spawn(self._accept_forever(sock))
        self._heartbeat = asyncio.create_task(self._heartbeats())
        log.info("agent tunnels: listening on %s:%d (host key %s)", self.host, self.port, self.fingerprint)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: do not spin
                log.warning("agent tunnels: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        """One new connection: a data link (TLS) or an agent's SSH session, told apart by its first byte."""
        loop = asyncio.get_running_loop()
        first = b""
        readable: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, ready)
        try:
            async with asyncio.timeout(SNIFF_SECONDS):
                await readable
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                sock.close()  # closed before it said anything
                return
        except TimeoutError:
            pass  # silent: an SSH client waiting for the server's version line
        except OSError:
            sock.close()
            return
        finally:
            loop.remove_reader(fd)
        try:
            if first == TLS_FIRST_BYTE and self._link_tls is not None:
                # Request/response traffic: no Nagle delay (uvloop sets this itself; asyncio does not).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.connect_accepted_socket(
                    lambda: LinkAcceptor(self.link_requests), sock, ssl=self._link_tls,
                    ssl_handshake_timeout=10,
                )  # fmt: skip
            else:
                await asyncssh.run_server(sock, options=self._ssh_options)
        except (OSError, asyncssh.Error, TimeoutError, ssl.SSLError) as exc:
            log.debug("agent tunnels: a connection failed before it was set up: %s", exc)
            sock.close()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for task in list(self._accepting):
            task.cancel()
        for task in list(self._accepting):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._close_sockets()
        for tunnel in list(self._all):
            tunnel.close()

    @property
    def fingerprint(self) -> str:
        return str(self.host_key.get_fingerprint("sha256"))

    # -- routing --
    def pick(self, connection: str, allowed_agents: list[str]) -> Tunnel:
        """A tunnel that serves `connection` (round robin across agents); raises NoAgent."""
        candidates = [
            t for t in self.tunnels.get(connection, ()) if not allowed_agents or t.agent in allowed_agents
        ]
        if not candidates:
            raise NoAgent(f"no agent serving connection {connection!r} is connected to this gateway replica")
        return candidates[next(self._round_robin) % len(candidates)]

    def status(self) -> list[dict[str, Any]]:
        """The tunnels of this replica, for /readyz, metrics and the UI."""
        return [
            {
                "agent": t.agent,
                "connections": sorted(t.serving),
                "version": t.version,
                "peer": t.peer,
                "since": t.since,
                "channels_open": t.channels_open,
                "channels_total": t.channels_total,
                "links_open": len(t.link_transports),
                "links": t.links_usable(),
            }
            for t in sorted(self._all, key=lambda t: (t.agent, t.since))
        ]

    def _register(self, tunnel: Tunnel, connection: str) -> None:
        tunnel.serving.add(connection)
        self.tunnels.setdefault(connection, []).append(tunnel)
        log.info("agent %s serves connection %s (from %s)", tunnel.agent, connection, tunnel.peer)

    def _unregister(self, tunnel: Tunnel, connection: str) -> None:
        tunnel.serving.discard(connection)
        serving = self.tunnels.get(connection, [])
        if tunnel in serving:
            serving.remove(tunnel)
        if not serving:
            self.tunnels.pop(connection, None)

    async def _connected(self, tunnel: Tunnel) -> None:
        self._all.add(tunnel)
        try:
            tunnel.session_id = await self.database.run(
                lambda s: store.open_session(
                    s,
                    agent=tunnel.agent,
                    replica=self.replica,
                    peer=tunnel.peer,
                    version=tunnel.version,
                    connections=sorted(tunnel.enrolled_for),
                )
            )
        except Exception as exc:  # the tunnel works without its row; `agents list` will miss it
            log.warning("agent %s: cannot record its tunnel in the database: %s", tunnel.agent, exc)

    def _disconnected(self, tunnel: Tunnel, exc: Exception | None) -> None:
        if tunnel not in self._all:
            return
        self._all.discard(tunnel)
        for connection in list(tunnel.serving):
            self._unregister(tunnel, connection)
        tunnel.control = None
        for transport in list(tunnel.link_transports):
            transport.abort()  # a link lives no longer than its tunnel (revoked, disconnected)
        log.warning("agent %s disconnected from %s%s", tunnel.agent, tunnel.peer, f": {exc}" if exc else "")
        if tunnel.session_id:
            session_id = tunnel.session_id
            task = asyncio.ensure_future(self.database.run(lambda s: store.close_session(s, session_id)))
            task.add_done_callback(_log_failure)

    async def _heartbeats(self) -> None:
        """Keep this replica's tunnel rows fresh, and cut agents revoked since they logged in."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            tunnels = list(self._all)
            if not tunnels:
                continue
            try:
                records = await self.database.run(functools.partial(_heartbeat, tunnels=tunnels))
            except Exception as exc:
                log.warning("agent heartbeat: database unavailable: %s", exc)
                continue
            for tunnel in tunnels:
                record = records.get(tunnel.agent)
                if (
                    record is None
                    or record.revoked_at is not None
                    or record.fingerprint != tunnel.fingerprint
                ):
                    log.warning("agent %s: identity revoked; closing its tunnel", tunnel.agent)
                    tunnel.close()


def _heartbeat(session: Any, tunnels: list[Tunnel]) -> dict[str, store.AgentRecord | None]:
    """Mark the tunnels seen; the agents' records, to find the revoked."""
    store.touch_sessions(session, [t.session_id for t in tunnels if t.session_id])
    return {t.agent: store.find_agent(session, t.agent) for t in tunnels}


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("agent tunnel bookkeeping failed: %s", task.exception())


class _Listener(asyncssh.SSHListener):
    """What `unix_server_requested` returns: no socket is opened; the hub opens channels itself."""

    def __init__(self, hub: Hub, tunnel: Tunnel, connection: str):
        super().__init__()
        self.hub, self.tunnel, self.connection = hub, tunnel, connection

    def close(self) -> None:
        self.hub._unregister(self.tunnel, self.connection)

    async def wait_closed(self) -> None:
        return None


class _AgentLogin(asyncssh.SSHServer):
    """One incoming SSH connection: an agent enrolling with a join token, or logging in with its key."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.conn: asyncssh.SSHServerConnection | None = None
        self.username = ""
        self.peer = ""
        self.join_token = ""
        self.record: store.AgentRecord | None = None
        self.tunnel: Tunnel | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.hub._disconnected(self.tunnel, exc)

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    # -- enrolment: password = join token --
    def password_auth_supported(self) -> bool:
        return self.username == JOIN_USER

    async def validate_password(self, username: str, password: str) -> bool:
        if username != JOIN_USER:
            return False
        usable = await self.hub.database.run(lambda s: store.join_token_usable(s, password))
        if not usable:
            log.warning("agent enrolment from %s refused: unknown, expired or used join token", self.peer)
            return False
        self.join_token = password
        return True

    # -- agents: public key = identity --
    def public_key_auth_supported(self) -> bool:
        return self.username != JOIN_USER

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        offered = _openssh_public(key)
        record = await self.hub.database.run(lambda s: store.find_agent(s, username))
        if (
            record is None
            or record.revoked_at is not None
            or _openssh_public_text(record.public_key) != offered
        ):
            log.warning("agent login as %r from %s refused: unknown or revoked identity", username, self.peer)
            return False
        self.record = record
        return True

    async def auth_completed(self) -> None:
        if self.username == JOIN_USER or self.record is None or self.conn is None:
            return
        version = str(self.conn.get_extra_info("client_version") or "")
        self.tunnel = Tunnel(
            agent=self.record.name,
            fingerprint=self.record.fingerprint,
            enrolled_for=frozenset(self.record.connections),
            conn=self.conn,
            peer=self.peer,
            version=version.removeprefix("SSH-2.0-"),
            link_requests=self.hub.link_requests if self.hub._link_tls is not None else None,
        )
        await self.hub._connected(self.tunnel)
        log.info("agent %s connected from %s (%s)", self.record.name, self.peer, self.tunnel.version)

    # -- what a logged-in agent may ask for --
    def unix_server_requested(self, listen_path: str) -> Any:
        tunnel = self.tunnel
        connection = listen_path.removeprefix(PATH_PREFIX)
        if tunnel is None or not listen_path.startswith(PATH_PREFIX):
            return False
        if connection not in tunnel.enrolled_for:
            log.warning(
                "agent %s may not serve connection %r (enrolled for: %s)",
                tunnel.agent,
                connection,
                ", ".join(sorted(tunnel.enrolled_for)) or "none",
            )
            return False
        self.hub._register(tunnel, connection)
        return _Listener(self.hub, tunnel, connection)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False

    def session_requested(self) -> Any:
        if self.username == JOIN_USER and self.join_token:
            return self._enrol
        if self.tunnel is not None:
            return self._links
        return False

    async def _links(
        self, stdin: asyncssh.SSHReader[str], stdout: asyncssh.SSHWriter[str], stderr: asyncssh.SSHWriter[str]
    ) -> None:
        """The `links` session: the gateway writes one line per data link it wants, ``{"link": NONCE,
        "connection": NAME}``; the agent answers only failures, ``{"link": NONCE, "error": REASON}``."""
        channel = cast("asyncssh.SSHServerChannel[str]", stdout.channel)
        tunnel = self.tunnel
        if channel.get_command() != LINKS_COMMAND or tunnel is None or tunnel.link_requests is None:
            stdout.write(json.dumps({"error": "data links are not available; use SSH channels"}) + "\n")
            channel.exit(1)
            return
        requests = tunnel.link_requests
        tunnel.control = stdout
        try:
            while line := await stdin.readline():
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                    report = json.loads(line)
                    requests.fail(str(report["link"]), str(report.get("error", "no reason given"))[:300])
        except (asyncssh.Error, OSError):
            pass
        finally:
            if tunnel.control is stdout:
                tunnel.control = None
        channel.exit(0)

    async def _enrol(
        self, stdin: asyncssh.SSHReader[str], stdout: asyncssh.SSHWriter[str], stderr: asyncssh.SSHWriter[str]
    ) -> None:
        """The `enroll` command: JSON {name, public_key, version} in, JSON {agent, connections} out."""
        channel = cast("asyncssh.SSHServerChannel[str]", stdout.channel)
        command = channel.get_command() or ""
        try:
            if command != ENROL_COMMAND:
                raise store.EnrolmentError(f"unknown command {command!r}")
            raw = await asyncio.wait_for(stdin.read(MAX_ENROL_REQUEST), 10)
            request = json.loads(raw)
            name, public_text = str(request["name"]), str(request["public_key"])
            key = asyncssh.import_public_key(public_text)
            if key.algorithm != b"ssh-ed25519":
                raise store.EnrolmentError("the agent key must be an Ed25519 key")
            fingerprint = str(key.get_fingerprint("sha256"))
            token = self.join_token
            record = await self.hub.database.run(
                lambda s: store.redeem_join_token(
                    s, token, agent_name=name, public_key=_openssh_public(key), fingerprint=fingerprint
                )
            )
        except (store.EnrolmentError, asyncssh.KeyImportError, KeyError, ValueError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, store.EnrolmentError) else f"bad enrolment request: {exc}"
            log.warning("agent enrolment from %s refused: %s", self.peer, reason)
            stdout.write(json.dumps({"error": reason}) + "\n")
            channel.exit(1)
            return
        log.info("agent %s enrolled from %s for %s", record.name, self.peer, ", ".join(record.connections))
        stdout.write(json.dumps({"agent": record.name, "connections": record.connections}) + "\n")
        channel.exit(0)


def _openssh_public(key: asyncssh.SSHKey) -> str:
    """``ALGORITHM BASE64`` without a comment: what is stored and compared."""
    return _openssh_public_text(key.export_public_key("openssh").decode())


def _openssh_public_text(text: str) -> str:
    return " ".join(text.split()[:2])


# -- one hub per process ----------------------------------------------------------------------------------

_hub: Hub | None = None


def current() -> Hub | None:
    """The running hub of this process, if any (the agent connection type asks it for tunnels)."""
    return _hub


async def acquire(factory: Callable[[], Hub]) -> Hub:
    """The process's hub, started with `factory` by its first user."""
    global _hub
    if _hub is None:
        hub = factory()
        await hub.start()
        _hub = hub
    _hub.users += 1
    return _hub


async def release(hub: Hub) -> None:
    global _hub
    hub.users -= 1
    if hub.users <= 0 and hub is _hub:
        _hub = None
        await hub.close()


def default_replica_name(port: int) -> str:
    return f"{socket.gethostname()}:{port}"
