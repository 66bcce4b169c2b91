"""An HTTP/2 client that opens no flow-control window holds its responses upstream (red team, 2026-12-08).

With `server: hypercorn`, a client whose SETTINGS say INITIAL_WINDOW_SIZE=0 (or that never returns the
connection's window) and that asked for large lists had the gateway read them whole into memory: Hypercorn's
sender pops 0 bytes from a stream without window, and its stream buffer released the application after
any short pop, so `send` never waited (10 streams of a 65 MB list: 135 -> 767 MB resident, the upstream
wrote 649 MB). Go's server blocks the handler until its frame is written, on the same window; the gateway
now does too (core/server.py `_FlowControlledStreamBuffer`): the upstream stalls once the socket buffers
between it and the gateway are full, and the response completes, intact, when the client opens its window.

WebSockets over HTTP/2 (extended CONNECT, which Hypercorn offers) go through the same buffer: an exec's output
waits for the window too. No sandbox: a stand-in API server counts what it managed to write.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from aiohttp import web
from conftest import Gateway, free_port, start_gateway, stop_process
from kubetest import ThreadedApp
from wsproto.frame_protocol import FrameProtocol, Opcode

TOKEN = "h2-window-token-0123456789abcdef"
STREAMS = 3
CHUNK = 64 * 1024
# A ConfigMap list of 65 MB, the red team's.
LIST = (
    b'{"kind":"ConfigMapList","apiVersion":"v1","metadata":{},"items":['
    + b",".join(b'{"metadata":{"name":"c%07d"},"data":{"k":"%s"}}' % (i, b"x" * 600) for i in range(100_000))
    + b"]}"
)
PATH = "/k8s/c/api/v1/configmaps"
OUTPUT = bytes(range(256)) * (64 * 1024 * 1024 // 256)  # an exec's stdout, 64 MB
EXEC = "/k8s/c/api/v1/namespaces/prod/pods/web/exec?command=cat&stdout=true"
# What may sit between the stand-in and a stalled stream: the loopback socket buffers (Linux autotunes them,
# up to 4 MB sending and 32 MB receiving by default; 7 MB a stream were measured), aiohttp's read buffer
# and one chunk in the gateway. Half the list; without the fix, all of it.
HELD_PER_STREAM = len(LIST) // 2
MAX_WINDOW = 2**31 - 1
ALICE = {"user": "alice", "groups": ["developers"], "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}


class ListServer(ThreadedApp):
    """Answers every GET with LIST in CHUNK writes, each awaited (aiohttp waits for the socket to drain),
    and counts the bytes written."""

    def __init__(self) -> None:
        self.written = 0
        self.finished = 0  # responses over, written to the end or cut off
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("GET", "/api/v1/namespaces/prod/pods/web/exec", self._exec)
        app.router.add_route("GET", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(LIST)
        response.content_type = "application/json"
        try:
            await response.prepare(request)
            for start in range(0, len(LIST), CHUNK):
                await response.write(LIST[start : start + CHUNK])
                self.written += len(LIST[start : start + CHUNK])
            return response
        finally:
            self.finished += 1

    async def _exec(self, request: web.Request) -> web.WebSocketResponse:
        """A pod's exec that writes OUTPUT on stdout, a CHUNK a message, each awaited."""
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io",))
        await ws.prepare(request)
        for start in range(0, len(OUTPUT), CHUNK):
            await ws.send_bytes(b"\x01" + OUTPUT[start : start + CHUNK])
            self.written += CHUNK
        await ws.close()
        return ws


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, ListServer]]:
    api = ListServer()
    directory = tmp_path_factory.mktemp("gw-h2-window")
    (directory / "upstream-token").write_text("upstream")
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(directory / "state"),
        "server": "hypercorn",
        "connections": {
            "c": {
                "upstream": {"server": api.url, "token_file": str(directory / "upstream-token")},
                "plugins": {"static-tokens": {"tokens": [ALICE]}},
            }
        },
    }
    gateway = start_gateway(directory, config)
    yield gateway, api
    stop_process(gateway.process)
    api.stop()


def resident_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024


class H2Client:
    """A raw HTTP/2 client over TLS that grants only the flow-control window it is told to."""

    def __init__(self, gw: Gateway, initial_window: int) -> None:
        host, port = gw.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=str(gw.ca_file))
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(
            socket.create_connection((host, int(port)), timeout=30), server_hostname=host
        )
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window}
        )
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, str] = {}
        self.bodies: dict[int, Any] = {}  # sha256 objects
        self.received: dict[int, int] = {}
        self.ended: set[int] = set()
        self.websockets: dict[int, bytearray] = {}  # what came on each WebSocket's stream

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def get(self, path: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        host = self.sock.server_hostname or ""
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", path),
                   ("authorization", f"Bearer {TOKEN}")]  # fmt: skip
        self.conn.send_headers(stream_id, headers, end_stream=True)
        self.flush()
        self.bodies[stream_id] = hashlib.sha256()
        self.received[stream_id] = 0
        return stream_id

    def websocket(self, path: str, protocol: str) -> int:
        """A WebSocket over HTTP/2 (RFC 8441's extended CONNECT, which Hypercorn's SETTINGS offer)."""
        self.read_until(lambda: bool(self.conn.remote_settings.enable_connect_protocol))
        stream_id = self.conn.get_next_available_stream_id()
        host = self.sock.server_hostname or ""
        headers = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                   (":authority", host), (":path", path), ("sec-websocket-version", "13"),
                   ("sec-websocket-protocol", protocol), ("authorization", f"Bearer {TOKEN}")]  # fmt: skip
        self.conn.send_headers(stream_id, headers)
        self.flush()
        self.bodies[stream_id] = hashlib.sha256()
        self.received[stream_id] = 0
        self.websockets[stream_id] = bytearray()
        return stream_id

    def read_until(self, done: Callable[[], bool]) -> None:
        """Handles frames until `done()` holds; DATA is counted and hashed, not acknowledged."""
        while not done():
            data = self.sock.recv(65536)
            assert data, "the gateway closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id].update(event.data)
                    self.received[event.stream_id] += len(event.data)
                    if event.stream_id in self.websockets:
                        self.websockets[event.stream_id] += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream {event.stream_id} reset: {event.error_code!r}")
            self.flush()

    def open_windows(self) -> None:
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW})
        self.conn.increment_flow_control_window(MAX_WINDOW - self.conn.inbound_flow_control_window)
        self.flush()

    def close(self) -> None:
        self.sock.close()


def wait_until_still(api: ListServer, ceiling: int) -> int:
    """The stand-in's count once it stopped moving (or reached `ceiling`, all it had to write)."""
    last, still = -1, 0
    for _ in range(120):
        time.sleep(0.25)
        if api.written == last:
            still += 1
            if still == 4:
                break
        else:
            last, still = api.written, 0
        if api.written >= ceiling:
            break
    return api.written


@pytest.mark.parametrize(
    "closed",
    [
        # SETTINGS INITIAL_WINDOW_SIZE=0: every stream starts without window.
        "stream",
        # Streams may take 2 GB each, but the connection's 65,535 bytes are never given back.
        "connection",
    ],
)
def test_a_client_without_window_holds_the_upstream_not_the_gateway(stack, closed):
    gw, api = stack
    before_rss = resident_mb(gw.process.pid)
    before_written = api.written
    client = H2Client(gw, 0 if closed == "stream" else MAX_WINDOW)
    try:
        streams = [client.get(PATH) for _ in range(STREAMS)]
        client.read_until(lambda: len(client.status) == STREAMS)
        assert set(client.status.values()) == {"200"}
        written = wait_until_still(api, before_written + STREAMS * len(LIST)) - before_written
        grown = resident_mb(gw.process.pid) - before_rss
        assert sum(client.received.values()) <= 65_535  # the client got no more than it allowed
        assert written <= STREAMS * HELD_PER_STREAM, (
            f"the upstream wrote {written} bytes for {STREAMS} streams the client opened no window for"
        )
        assert grown < 64, f"the gateway grew {grown} MB holding responses for a client without window"

        client.open_windows()
        client.read_until(lambda: client.ended >= set(streams))
        expected = hashlib.sha256(LIST).hexdigest()
        for stream_id in streams:
            assert client.received[stream_id] == len(LIST)
            assert client.bodies[stream_id].hexdigest() == expected
    finally:
        client.close()


@pytest.mark.parametrize("leaving", ["reset", "close"])
def test_a_client_that_leaves_releases_what_waited_for_its_window(stack, leaving):
    # A stream reset (RST_STREAM) or a connection closed while `send` waits for the window: that `send` is
    # released, so the response's task ends (and the connection's with it) instead of waiting forever.
    gw, api = stack
    before_written, before_finished = api.written, api.finished
    client = H2Client(gw, 0)
    try:
        streams = [client.get(PATH) for _ in range(STREAMS)]
        client.read_until(lambda: len(client.status) == STREAMS)
        wait_until_still(api, before_written + STREAMS * len(LIST))
        assert api.finished == before_finished  # all three are waiting for the window
        if leaving == "reset":
            for stream_id in streams:
                client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
    finally:
        if leaving == "close":
            client.close()
    for _ in range(240):
        if api.finished == before_finished + STREAMS:
            break
        time.sleep(0.25)
    assert api.finished == before_finished + STREAMS, "a response for a client that left is still waiting"
    client.close()


def websocket_payload(stream: bytes) -> bytes:
    """The data messages' payloads in a server's WebSocket frames, up to its close."""
    frames = FrameProtocol(client=True, extensions=[])
    frames.receive_bytes(stream)
    payload = bytearray()
    for frame in frames.received_frames():
        if frame.opcode is Opcode.CLOSE:
            break
        payload += frame.payload
    return bytes(payload)


def test_a_websocket_over_http2_without_window_holds_the_upstream(stack):
    # The same buffer carries a WebSocket's messages: an exec's output waits for the window too.
    gw, api = stack
    before_written = api.written
    client = H2Client(gw, 0)
    try:
        stream_id = client.websocket(EXEC, "v5.channel.k8s.io")
        client.read_until(lambda: stream_id in client.status)
        assert client.status[stream_id] == "200"
        written = wait_until_still(api, before_written + len(OUTPUT)) - before_written
        assert written <= len(OUTPUT) // 2, f"the pod wrote {written} bytes to a client without window"

        client.open_windows()
        client.read_until(lambda: stream_id in client.ended)
        messages = websocket_payload(bytes(client.websockets[stream_id]))
        stdout = b"".join(messages[i + 1 : i + 1 + CHUNK] for i in range(0, len(messages), CHUNK + 1))
        assert stdout == OUTPUT
    finally:
        client.close()
