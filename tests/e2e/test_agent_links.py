"""Data links against a real hub (SSH and TLS on one port, a real SQLite database) and a hand-driven agent:
a link binds only to the request that asked for it, once; strangers, guesses and replays are dropped; a link
dies with its tunnel; the agent checks the pin before its nonce leaves; a failed link falls back to an SSH
channel. And through real kubectl: a gateway with `links: false` serves over SSH channels only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import free_port, start_gateway, stop_process
from e2e.agent_stack import (
    AGENT_CONNECTION,
    agent_gateway_config,
    join_token,
    start_agent,
    wait_for_log,
    wait_ready,
)
from kubetest import run_kubectl, wait_for_async

from kubegate.connections.agent import hub as hubs
from kubegate.connections.agent import keys, store
from kubegate.connections.agent.channels import ChannelSession
from kubegate.connections.agent.links import LINK_GREETING, LINKS_COMMAND, LinkFailed, client_context
from kubegate.connections.agent.ssh import asyncssh
from kubegate.core.db import Database


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class HubWithAgent:
    def __init__(self, hub: hubs.Hub, conn: asyncssh.SSHClientConnection, process: Any, tunnel: hubs.Tunnel):
        self.hub, self.conn, self.process, self.tunnel = hub, conn, process, tunnel

    async def next_request(self) -> dict[str, str]:
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        return json.loads(line)

    async def dial(self, greeting: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.hub.port, ssl=client_context())
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert keys.certificate_fingerprint(der) == self.hub.fingerprint  # the pin an agent checks
        writer.write(greeting)
        await writer.drain()
        return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except (ConnectionError, ssl.SSLError):
        return True


@contextlib.asynccontextmanager
async def enrolled_hub(
    tmp_path: Path, *, links: bool = True, session_factory: Any = asyncssh.SSHUNIXSession
) -> AsyncIterator[HubWithAgent]:
    """A real hub with its SQLite database, and an agent `edge-1` enrolled and logged in over SSH that
    listens for `AGENT_CONNECTION` (channels go to `session_factory`) and has opened its `links` session."""
    database = Database(f"sqlite:///{tmp_path / 'kubegate.db'}")
    agent_key = asyncssh.generate_private_key("ssh-ed25519")
    public = agent_key.export_public_key("openssh").decode().split()
    token, _ = database.call(lambda s: store.mint_join_token(s, [AGENT_CONNECTION], ttl_seconds=60))
    database.call(lambda s: store.redeem_join_token(s, token, agent_name="edge-1", public_key=" ".join(public[:2]),
                                                    fingerprint=agent_key.get_fingerprint("sha256")))  # fmt: skip
    hub = hubs.Hub(host="127.0.0.1", port=0, host_key=asyncssh.generate_private_key("ssh-ed25519"),
                   database=database, replica="test", heartbeat_seconds=1, links=links)  # fmt: skip
    await hub.start()
    try:
        async with asyncssh.connect("127.0.0.1", hub.port, username="edge-1", client_keys=[agent_key],
                                    known_hosts=None, agent_path=None, config=()) as conn:  # fmt: skip
            await conn.create_unix_server(session_factory, f"kubegate/{AGENT_CONNECTION}")
            process = await conn.create_process(LINKS_COMMAND)
            tunnel = hub.pick(AGENT_CONNECTION, [])
            if links:
                await wait_for_async(tunnel.links_usable, "the links session to start", interval=0.02)
            yield HubWithAgent(hub, conn, process, tunnel)
    finally:
        await hub.close()
        database.close()


@pytest.fixture
async def hub_with_agent(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[HubWithAgent]:
    async with enrolled_hub(tmp_path, links=getattr(request, "param", True)) as hub_and_agent:
        yield hub_and_agent


async def test_a_link_binds_once_to_its_request_and_strangers_guesses_and_replays_are_dropped(
    hub_with_agent: HubWithAgent,
):
    h = hub_with_agent
    protocol = Recorder()
    opening = asyncio.ensure_future(h.tunnel.open_link(AGENT_CONNECTION, protocol))
    request = await h.next_request()
    assert request["connection"] == AGENT_CONNECTION
    nonce = request["link"]

    # Before the agent answers: a stranger guessing, a stranger speaking HTTP, and plain garbage.
    for greeting in (LINK_GREETING + b"A" * 32 + b"\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\n"):
        reader, writer = await h.dial(greeting)
        assert await closed_by_peer(reader), greeting
        writer.close()
    assert not opening.done()

    reader, writer = await h.dial(LINK_GREETING + nonce.encode() + b"\nfirst bytes")
    await asyncio.wait_for(opening, 5)
    await asyncio.sleep(0.05)
    assert protocol.data == b"first bytes"
    assert protocol.transport is not None
    protocol.transport.write(b"answer")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"answer"
    status = h.hub.status()[0]
    assert status["links_open"] == 1 and status["channels_open"] == 1

    # The same greeting once more (a replay, e.g. by someone who saw it): dropped, the first link unharmed.
    replay_reader, replay_writer = await h.dial(LINK_GREETING + nonce.encode() + b"\n")
    assert await closed_by_peer(replay_reader)
    replay_writer.close()
    protocol.transport.write(b"still")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"

    # The link lives no longer than its tunnel: the agent's SSH connection goes, the link is closed.
    h.conn.close()
    await asyncio.wait_for(protocol.lost, 10)
    assert await closed_by_peer(reader)
    writer.close()


async def test_a_failure_the_agent_reports_ends_the_wait(hub_with_agent: HubWithAgent):
    h = hub_with_agent
    opening = asyncio.ensure_future(h.tunnel.open_link(AGENT_CONNECTION, Recorder()))
    request = await h.next_request()
    h.process.stdin.write(json.dumps({"link": request["link"], "error": "no route to the gateway"}) + "\n")
    with pytest.raises(LinkFailed, match="no route"):
        await asyncio.wait_for(opening, 5)
    # Too late: the nonce is gone.
    reader, writer = await h.dial(LINK_GREETING + request["link"].encode() + b"\n")
    assert await closed_by_peer(reader)
    writer.close()


class TinyServer(asyncio.Protocol):
    """What an agent's relay would be on an SSH channel: answers every request with 200 "channel"."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nchannel")


async def test_a_link_that_fails_falls_back_to_an_ssh_channel(tmp_path: Path, monkeypatch, caplog):
    from kubegate.connections.agent.upstream import TUNNEL_HOST, TunnelConnector

    async with enrolled_hub(tmp_path, session_factory=lambda: ChannelSession(TinyServer())) as h:
        monkeypatch.setattr(hubs, "_hub", h.hub)
        process, tunnel = h.process, h.tunnel

        async def refuse_links() -> None:
            while line := await process.stdout.readline():
                nonce = json.loads(line)["link"]
                process.stdin.write(json.dumps({"link": nonce, "error": "TLS blocked here"}) + "\n")

        refusing = asyncio.ensure_future(refuse_links())
        connector = TunnelConnector(AGENT_CONNECTION, [], limit=4)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(f"http://{TUNNEL_HOST}/api") as response:
                assert (response.status, await response.read()) == (200, b"channel")
            assert not tunnel.links_usable()  # channels for a while; no link asked for each request
            assert "TLS blocked here" in caplog.text
            async with session.get(f"http://{TUNNEL_HOST}/api", headers={"Connection": "close"}) as again:
                assert await again.read() == b"channel"
        refusing.cancel()
        assert h.hub.status()[0]["links_open"] == 0


@pytest.mark.parametrize("hub_with_agent", [False], indirect=True)
async def test_with_links_off_the_links_session_is_refused(hub_with_agent: HubWithAgent):
    h = hub_with_agent
    line = await asyncio.wait_for(h.process.stdout.readline(), 5)
    assert "not available" in json.loads(line)["error"]
    await asyncio.wait_for(h.process.wait_closed(), 5)
    assert h.process.exit_status == 1
    assert not h.tunnel.links_usable()
    # The same port still speaks TLS to nobody: a link attempt is taken for SSH and fails.
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", h.hub.port, ssl=client_context()), 5)


async def test_the_agent_sends_its_nonce_only_to_the_pinned_key(tmp_path: Path):
    """A TLS listener with another key (a gateway impostor on the link's path): the agent closes the
    connection after the handshake without a byte and tells the gateway the link failed."""
    from kubegate.agent.config import AgentSettings
    from kubegate.agent.run import Agent
    from kubegate.connections.agent.links import new_nonce, server_context

    received: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = b""
        try:
            while chunk := await reader.read(1024):
                got += chunk
        except (ConnectionError, ssl.SSLError):
            pass  # the agent aborts: a reset
        received.append(got)
        writer.close()

    server = await asyncio.start_server(
        impostor, "127.0.0.1", 0, ssl=server_context(asyncssh.generate_private_key("ssh-ed25519"))
    )
    port = server.sockets[0].getsockname()[1]
    pinned = keys.fingerprint(asyncssh.generate_private_key("ssh-ed25519"))
    settings = AgentSettings.model_validate({
        "name": "edge-1", "gateways": [f"127.0.0.1:{port}"], "gateway_host_key": pinned,
        "identity_file": str(tmp_path / "id"), "connections": {AGENT_CONNECTION: {"server": "https://127.0.0.1:1"}},
    })  # fmt: skip
    agent = Agent(settings, tmp_path / "agent.yaml")
    agent.forwarders[AGENT_CONNECTION] = object()  # type: ignore[assignment]  # never reached

    class Report:
        lines: list[str] = []

        def write(self, text: str) -> None:
            self.lines.append(text)

    report = Report()
    nonce = new_nonce()
    await agent._open_link("127.0.0.1", port, nonce, AGENT_CONNECTION, report)  # type: ignore[arg-type]
    await wait_for_async(lambda: received, "a connection to the impostor", interval=0.02)
    server.close()
    assert received == [b""]  # the handshake, then nothing: the nonce never left
    (line,) = report.lines
    assert json.loads(line) == {"link": nonce, "error": "the link's certificate is not the pinned host key"}


@pytest.mark.needs_pods
def test_kubectl_through_ssh_channels_when_links_are_off(sandbox, tmp_path: Path):
    ssh_port = free_port()
    config = agent_gateway_config(sandbox, tmp_path / "gateway", ssh_port)
    config["plugins"]["agents"]["links"] = False
    gateway = start_gateway(tmp_path / "gateway", config)
    agent = None
    try:
        joined = join_token(gateway.config, "edge-1")
        agent = start_agent(tmp_path / "agent", sandbox, name="edge-1", gateways=[f"127.0.0.1:{ssh_port}"],
                            host_key=joined["host_key"], token=joined["token"])  # fmt: skip
        wait_ready(gateway, agent=agent)
        kubeconfig = gateway.kubeconfig("alice", AGENT_CONNECTION)
        listed = run_kubectl(kubeconfig, "get", "namespaces", "-o", "name")
        assert listed.returncode == 0 and "namespace/default" in listed.stdout, listed.stderr
        executed = run_kubectl(kubeconfig, "exec", "web", "-n", "prod", "--", "echo", "over-a-channel")
        assert executed.returncode == 0 and "over-a-channel" in executed.stdout, executed.stderr
        wait_for_log(agent.log, "no data links")
        assert "data link" not in gateway.log.read_text()
    finally:
        if agent is not None:
            agent.stop()
        stop_process(gateway.process)
