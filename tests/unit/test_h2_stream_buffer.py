"""`server: hypercorn`'s HTTP/2 stream buffer (core/server.py `_FlowControlledStreamBuffer`) releases the
application's `send` only once what it holds falls below the low-water mark: Hypercorn's sender pops 0 bytes
(or a window's few bytes) from a stream whose flow-control window is closed, and Hypercorn's own buffer
released `send` after any such short pop, so a client that opened no window had whole responses buffered.
tests/adversarial/test_h2_flow_control.py tries it through a real gateway."""

from __future__ import annotations

import asyncio

import hypercorn.protocol
import hypercorn.protocol.h2
import pytest
from hypercorn.asyncio.worker_context import EventWrapper
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER

from kubegate.core.server import _FlowControlledStreamBuffer, _H2Protocol, _use_gateway_h2

CHUNK = b"x" * 65536  # what the proxy sends at a time, above the high-water mark


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_send_waits_while_the_window_is_closed():
    buffer = _FlowControlledStreamBuffer(EventWrapper)
    send = asyncio.create_task(buffer.push(CHUNK))
    await settle()
    assert not send.done()  # over the high-water mark: the application waits
    for _ in range(10):
        assert await buffer.pop(0) == b""  # the sender, with no window
        await settle()
        assert not send.done()
    # A window of a few bytes at a time (WINDOW_UPDATE of 1) releases nothing either.
    assert await buffer.pop(1) == b"x"
    await settle()
    assert not send.done()
    send.cancel()


async def test_send_resumes_once_the_buffer_drains_below_the_low_water_mark():
    buffer = _FlowControlledStreamBuffer(EventWrapper)
    send = asyncio.create_task(buffer.push(CHUNK))
    await settle()
    while len(buffer.buffer) >= BUFFER_LOW_WATER:
        assert not send.done()
        await buffer.pop(16384)  # one frame, as the window allows
        await settle()
    await asyncio.wait_for(send, 1)
    # The next chunk waits again: at most one chunk and a frame are ever held.
    send = asyncio.create_task(buffer.push(CHUNK))
    await settle()
    assert not send.done() and len(buffer.buffer) < len(CHUNK) + BUFFER_HIGH_WATER
    send.cancel()


async def test_a_closed_stream_releases_a_waiting_send():
    buffer = _FlowControlledStreamBuffer(EventWrapper)
    send = asyncio.create_task(buffer.push(CHUNK))
    await settle()
    await buffer.close()  # the client reset the stream, or the connection closed
    await asyncio.wait_for(send, 1)


async def test_small_sends_do_not_wait():
    buffer = _FlowControlledStreamBuffer(EventWrapper)
    await asyncio.wait_for(buffer.push(b"x" * (BUFFER_HIGH_WATER - 1)), 1)


def test_the_gateway_serves_http2_with_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hypercorn.protocol, "H2Protocol", hypercorn.protocol.H2Protocol)
    monkeypatch.setattr(hypercorn.protocol.h2, "StreamBuffer", hypercorn.protocol.h2.StreamBuffer)
    _use_gateway_h2()
    assert hypercorn.protocol.H2Protocol is _H2Protocol
    # H2Protocol._create_stream makes each stream's buffer (HTTP and WebSocket alike) by this name.
    assert hypercorn.protocol.h2.StreamBuffer is _FlowControlledStreamBuffer
