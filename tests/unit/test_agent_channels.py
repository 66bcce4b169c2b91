"""An SSH channel as an asyncio transport (connections/agent/channels.py), against a recording fake channel."""

from __future__ import annotations

import asyncio

from kubegate.connections.agent.channels import COALESCE_LIMIT, ChannelSession


class FakeChannel:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.buffered = 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.events.append(f"limits {high} {low}")

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.events.append("close")

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data.append(data)


def _open() -> tuple[FakeChannel, ChannelSession, Recorder]:
    channel, protocol = FakeChannel(), Recorder()
    session = ChannelSession(protocol)
    session.connection_made(channel)  # type: ignore[arg-type]
    return channel, session, protocol


async def test_writes_of_one_loop_pass_leave_as_one_channel_write():
    channel, _, protocol = _open()
    transport = protocol.transport
    assert transport is not None
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"body")
    assert channel.writes == []  # held until the loop comes round
    assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
    await asyncio.sleep(0)
    assert channel.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert transport.get_write_buffer_size() == 0


async def test_a_large_batch_goes_at_once_and_close_and_eof_flush_first():
    channel, _, protocol = _open()
    transport = protocol.transport
    assert transport is not None
    transport.write(b"x" * COALESCE_LIMIT)
    assert channel.writes == [b"x" * COALESCE_LIMIT]  # not held: bulk data keeps moving
    transport.write(b"tail")
    transport.write_eof()
    assert channel.writes[-1] == b"tail" and channel.events[-1] == "eof"
    transport.write(b"last")
    transport.close()
    assert channel.writes[-1] == b"last" and channel.events[-1] == "close"
    transport.write(b"after close")  # dropped, as on a socket
    await asyncio.sleep(0)
    assert b"after close" not in channel.writes


async def test_reading_pauses_reach_the_channel_and_set_protocol_moves_the_data():
    channel, session, protocol = _open()
    transport = protocol.transport
    assert transport is not None
    transport.pause_reading()
    transport.pause_reading()
    transport.resume_reading()
    assert [e for e in channel.events if e in ("pause", "resume")] == ["pause", "resume"]
    other = Recorder()
    transport.set_protocol(other)
    assert transport.get_protocol() is other
    session.data_received(b"to the new one", None)  # type: ignore[arg-type]
    assert other.data == [b"to the new one"] and protocol.data == []


async def test_writes_after_the_channel_is_lost_are_dropped():
    channel, session, protocol = _open()
    transport = protocol.transport
    assert transport is not None
    transport.write(b"pending")
    session.connection_lost(None)
    await asyncio.sleep(0)
    assert channel.writes == [] and transport.is_closing()
