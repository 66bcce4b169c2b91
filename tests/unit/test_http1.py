"""core/http1.py: the gateway's HTTP/1.1 protocol reads a request's head as the API server does: up to 1 MiB
(+ Go's 4096), past that 431 and the connection closed, before the app sees anything; a head that does not
arrive within the timeout closes the connection; heads below the limit and slow bodies are served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from kubegate.core.http1 import MAX_HEAD_BYTES, GatewayHttpToolsProtocol


class QuickTimeout(GatewayHttpToolsProtocol):
    head_timeout_seconds = 0.5


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """uvicorn with the gateway's protocol (or `request.param`) on 127.0.0.1: (port, the scopes the app saw).
    The app reads the body and answers with its size."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        if scope["path"] == "/slow":  # a response that takes longer than the head timeout (a held request)
            await asyncio.sleep(1.2)
        if scope["path"] == "/refuse":  # an answer that leaves the body unread (and says nothing of closing)
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"7")]})
            await send({"type": "http.response.body", "body": b"refused"})
            return
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = str(size).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    protocol = getattr(request, "param", GatewayHttpToolsProtocol)
    config = uvicorn.Config(
        app, http=protocol, lifespan="off", log_config=None, access_log=False, loop="none"
    )
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve(sockets=[listener]))
    while not served.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    yield listener.getsockname()[1], seen
    served.should_exit = served.force_exit = True
    await task


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def test_heads_up_to_the_api_servers_limit_are_served_one_after_another(server):
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    big = b"x" * ((1 << 20) - 2048)  # a 1 MiB header section, as the API server still takes
    for _ in range(2):  # keep-alive: each request's head is counted on its own
        writer.write(
            b"POST / HTTP/1.1\r\nHost: test\r\nX-Big: " + big + b"\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert await response(reader) == (200, b"5")
    writer.close()
    assert len(seen) == 2


async def test_a_head_that_does_not_end_gets_431_and_the_app_never_sees_it(server):
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # 64 MiB of one header, never ended: what the server does not read stays in the client's buffers.
    writer.write(b"GET /k8s/x/api HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * (64 << 20))
    status, body = await asyncio.wait_for(response(reader), 10)
    assert status == 431
    status_body = json.loads(body)
    assert status_body["kind"] == "Status" and status_body["reason"] == "RequestHeaderFieldsTooLarge"
    assert str(MAX_HEAD_BYTES) in status_body["message"]
    assert writer.transport.get_write_buffer_size() > 32 << 20  # most of it was never read
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection is closed
    assert seen == []


@pytest.mark.parametrize("server", [QuickTimeout], indirect=True)
async def test_a_head_sent_too_slowly_closes_the_connection_and_a_slow_body_does_not(server):
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n")  # and the rest never comes
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed (or reset) within the timeout
    assert seen == []

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n\r\n")
    for byte in b"body":  # the body over 1.2 s: only the head has a deadline
        await asyncio.sleep(0.3)
        writer.write(bytes([byte]))
    assert await response(reader) == (200, b"4")
    await asyncio.sleep(0.8)  # an idle keep-alive connection is not closed by the head timer
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    assert await response(reader) == (200, b"0")
    writer.close()


@pytest.mark.parametrize("server", [QuickTimeout], indirect=True)
async def test_the_head_time_of_a_pipelined_request_starts_after_the_response_before_it(server):
    """A client that sends the start of its next request while a slow response is still coming: the head
    timer does not drop the connection (and the response) meanwhile; the head still has to come after."""
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\n")  # the second head unfinished
    assert await asyncio.wait_for(response(reader), 5) == (200, b"0")
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # its head never came: dropped after all


async def test_an_endless_trailer_drops_the_connection(server):
    """A chunked body's trailers are headers too: past the limit the connection is dropped (no answer can
    be written, the request went to the app already), instead of the parser keeping them."""
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
    )
    writer.write(b"a" * (64 << 20))
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    assert len(seen) == 1  # the request itself was passed on; its response never came


async def test_a_large_body_is_not_counted_as_head(server):
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"b" * (8 << 20)
    writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (65536, b"c" * 65536) for _ in range(64)) + b"0\r\nX-Done: yes\r\n\r\n"
    )
    writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert await asyncio.wait_for(response(reader), 10) == (200, str(len(body)).encode())
    assert await asyncio.wait_for(response(reader), 10) == (200, str(64 * 65536).encode())
    writer.close()


async def keep_sending(writer: asyncio.StreamWriter, piece: bytes, most: int) -> int:
    """Send `piece` until the server closes the connection, or `most` bytes were sent; how many were sent."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < most:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    return sent


@pytest.mark.parametrize(
    ("head", "piece"),
    [
        (b"POST /refuse HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000000000\r\n\r\n", b"a" * 65536),
        (b"POST /refuse HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"%x\r\n%s\r\n" % (65536, b"a" * 65536)),
    ],
    ids=["content-length", "chunked"],
)  # fmt: skip
async def test_a_body_left_unread_by_the_answer_closes_the_connection(server, head, piece):
    """An app that answers without reading the body to its end (a refusal past its read budget, or an API
    server that answered before it read the body): the answer reaches the client and the connection
    closes, instead of uvicorn parsing and dropping the rest of a body declared endless (Go closes such a
    connection too). What the client gets to send before is bounded by the socket buffers, far below the
    256 MiB this client would send."""
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    answer = asyncio.create_task(response(reader))
    sent = await asyncio.wait_for(keep_sending(writer, piece, 256 << 20), 30)
    assert sent < 64 << 20
    assert await asyncio.wait_for(answer, 10) == (413, b"refused")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_keep_alive_connection_goes_on_after_a_body_that_was_read(server):
    """Only a body left unread closes the connection: requests whose body was read keep it, also when the
    next request came before the answer (pipelined)."""
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nabc"
                 b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)  # fmt: skip
    assert await asyncio.wait_for(response(reader), 10) == (200, b"3")
    assert await asyncio.wait_for(response(reader), 10) == (200, b"5")
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    assert await asyncio.wait_for(response(reader), 10) == (200, b"0")
    writer.close()
    assert len(seen) == 3
