"""What `server: hypercorn` relies on Hypercorn for, pinned: a request head that never ends is closed by the
keep-alive timeout (a connection counts as idle until its head is complete), however it trickles in; the
head limit is the API server's (core/server.py `hypercorn_config` sets it; e2e test_gateway_hypercorn.py
sends a 200 KB token through kubectl over both protocols)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from kubegate.core.http1 import MAX_HEAD_BYTES


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_an_endless_head_is_closed_by_the_keep_alive_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.fileno()}"]
    config.keep_alive_timeout = 1  # 75 in the gateway
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # a header line every 0.1 s, for up to 4 s
            writer.write(b"X-Slow: a\r\n")
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(100), 0.1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
        assert closed, "Hypercorn kept reading a head that never ends"
        writer.close()

        # A complete request is still served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Large: " + b"a" * 200_000 + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        listener.detach()  # Hypercorn closed the descriptor it was given
