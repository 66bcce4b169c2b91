"""An SSH channel seen as an asyncio transport, so that aiohttp's HTTP client (gateway side) and HTTP server
(agent side) run over a tunnel channel exactly as over a socket.

asyncssh's session callbacks mirror asyncio's protocol callbacks one to one, so each direction is a thin
adapter: :class:`ChannelTransport` forwards the protocol's writes and flow control to the channel, and
:class:`ChannelSession` forwards the channel's data and flow control to the protocol. Backpressure is end to
end: a protocol that stops reading pauses the channel, which stops granting SSH window, which pauses the
writer on the other side — for that channel only, so one slow watch never stalls another.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .ssh import asyncssh

# asyncssh's default per-channel receive window (2 MiB) keeps a fast stream moving across one round trip;
# the write buffer limits keep what a channel queues locally small while the peer's window is closed.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024


# An SSH channel packet carries up to this many bytes (asyncssh's default is 32 KiB): an exec frame or a
# list answer crosses in one or two packets instead of many, each of which costs an encryption, a MAC and,
# with asyncssh, an extra SSH_MSG_IGNORE packet. Both ends ask for it when they open/accept a channel.
CHANNEL_MAX_PACKET = 256 * 1024
# Writes within one event-loop pass are sent as one channel write (aiohttp writes a response's head and body
# separately); a batch that reaches this size goes at once.
COALESCE_LIMIT = 64 * 1024


class ChannelTransport(asyncio.Transport):
    """The asyncio transport side of one SSH channel (forwarded stream-local connection)."""

    def __init__(
        self,
        channel: asyncssh.SSHUNIXChannel[bytes],
        extra: dict[str, Any] | None = None,
        session: ChannelSession | None = None,
    ):
        super().__init__(extra)
        self._channel = channel
        self._session = session
        self._closing = False
        self._reading = True
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._loop = asyncio.get_running_loop()
        channel.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    # -- writing --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return  # like a socket transport: writes after close are dropped
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= COALESCE_LIMIT:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            if not self._closing:
                self._channel.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if not self._closing:
            self._flush()
            self._channel.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._channel.get_write_buffer_size() + self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return WRITE_BUFFER_LOW, WRITE_BUFFER_HIGH

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._channel.set_write_buffer_limits(high, low)

    # -- reading --
    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._channel.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._channel.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    # -- closing --
    def close(self) -> None:
        if not self._closing:
            self._flush()
            self._closing = True
            self._channel.close()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert self._session is not None
        self._session.protocol = protocol  # type: ignore[assignment]  # data now goes to the new protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._session is not None
        return self._session.protocol

    def mark_closed(self) -> None:
        self._closing = True
        self._pending.clear()
        self._pending_size = 0


class ChannelSession(asyncssh.SSHUNIXSession[bytes]):
    """Feeds one SSH channel into an asyncio protocol (aiohttp's client or server protocol)."""

    def __init__(self, protocol: asyncio.Protocol, extra: dict[str, Any] | None = None):
        self.protocol = protocol
        self.transport: ChannelTransport | None = None
        self._extra = extra or {}

    def connection_made(self, chan: asyncssh.SSHUNIXChannel[bytes]) -> None:
        self.transport = ChannelTransport(chan, self._extra, self)
        self.protocol.connection_made(self.transport)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool:
        # Half-close as on a socket: the protocol decides whether the other direction stays open.
        return bool(self.protocol.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport.mark_closed()
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()
