"""exec / attach / port-forward subresources of the sandbox cluster, on the real wire protocols.

Remote command (exec, attach) over WebSocket, as the apiserver (v5) and kubelet (v1-v4) speak it:

* subprotocols, first one the client offers that we know wins: ``v5.channel.k8s.io`` (kubectl >= 1.31
  offers only this), ``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, ``channel.k8s.io``,
  ``base64.channel.k8s.io`` (no header at all = ``channel.k8s.io``);
* every message is ``<channel><payload>``; binary frames carry the channel as a byte, the base64 variants
  use text frames with the channel as an ASCII digit and a base64 payload. Channels: 0 stdin, 1 stdout,
  2 stderr, 3 error/status, 4 resize (JSON ``{"Width":w,"Height":h}``); v5 adds ``0xFF <channel>`` = the
  client closed that stream (kubectl sends ``\\xff\\x00`` at stdin EOF);
* right after the upgrade the server writes one EMPTY message on the lowest writable channel (stdout,
  else stderr, else error) — the apiserver and kubelet do, so clients know the streams are up;
* at the end the error channel carries exactly one metav1.Status JSON (v4/v5; v1-v3 carry a plain text
  error and nothing on success), then a normal close. client-go reads channel 3 until the WebSocket
  closes and decodes it once, so the status must be a single document.

Port-forward: ``SPDY/3.1+portforward.k8s.io`` (kubectl >= 1.31: SPDY/3.1 frames tunnelled in binary
messages, see spdy.py) and the channel protocols with ``?ports=`` (channel 2i data, 2i+1 errors, each
channel's first message is the port as little-endian uint16).

Both also work over a plain SPDY/3.1 upgrade (``POST`` + ``Upgrade: SPDY/3.1`` +
``X-Stream-Protocol-Version``), which is kubectl's fallback when the WebSocket attempt is refused, what
older kubectl and every client-go SPDY executor use, and what ``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false``
/ ``KUBECTL_PORT_FORWARD_WEBSOCKETS=false`` force: one SPDY stream per stdio channel (``streamtype``
header) for exec/attach, and the same data/error stream pairs as the tunnel for port-forward.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from kubegate.sandbox import goparse, spdy
from kubegate.sandbox.runtime import (
    Container,
    ExecError,
    Pod,
    PodRuntime,
    Process,
    parse_resize,
    read_fd,
    write_fd,
)

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
V1 = "channel.k8s.io"
V1_BASE64 = "base64.channel.k8s.io"
REMOTECOMMAND_PROTOCOLS = (V5, V4, V4_BASE64, V1, V1_BASE64)
SPDY_TUNNEL = "SPDY/3.1+portforward.k8s.io"
PORTFORWARD_SPDY = "portforward.k8s.io"
PORTFORWARD_CHANNEL_PROTOCOLS = (V4, V4_BASE64, V1, V1_BASE64)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CLOSE = 0xFF
# How long output that is still in the pipes may take to arrive after the process exited (a background
# child holding the pipe open must not keep the session alive forever).
DRAIN_AFTER_EXIT = 2.0
# The apiserver's idle timeout for these connections is 4 h; client-go pings every 5 s, aiohttp answers.
WS_SETTINGS: dict[str, Any] = {"compress": False, "max_msg_size": 16 * 1024 * 1024, "autoping": True}


StdinFn = Callable[[bytes], Awaitable[None]]
ResizeFn = Callable[[int, int], None]
CloseFn = Callable[[], None]


class Session(Protocol):
    """One exec/attach session as the process side sees it, whatever the wire (WebSocket or SPDY)."""

    async def send(self, channel: int, data: bytes) -> None: ...

    async def serve_input(self, on_stdin: StdinFn, on_resize: ResizeFn, on_close_stdin: CloseFn) -> None: ...

    async def finish(self, status: dict[str, Any] | None, text_error: str | None = None) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Status helpers
# ---------------------------------------------------------------------------------------------------
def status_obj(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        obj["details"] = details
    obj["code"] = code
    return obj


def status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_obj(code, reason, message), status=code)


def bad_request(message: str) -> web.Response:
    return status_response(400, "BadRequest", message)


def exit_status(rc: int) -> dict[str, Any]:
    """The Status the kubelet writes on channel 3 when the command ends (json.Marshal field order)."""
    if rc == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {rc}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]},
    }


def internal_error_status(err: str) -> dict[str, Any]:
    """apierrors.NewInternalError(err).Status(), as the apiserver/kubelet write it for a failed start."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {err}",
        "reason": "InternalError",
        "details": {"causes": [{"message": err}]},
        "code": 500,
    }


def runc_exec_error(err: str) -> str:
    # The wording containerd+runc produce, so clients (and gateway tests) see a realistic message.
    return (
        "error executing command in container: failed to exec in container: failed to start exec "
        f'"{secrets.token_hex(32)}": OCI runtime exec failed: exec failed: unable to start container '
        f"process: {err}: unknown"
    )


# ---------------------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------------------
def _flag(request: web.Request, name: str) -> bool:
    # PodExecOptions/PodAttachOptions booleans: Convert_Slice_string_To_bool on the first value.
    return goparse.go_bool(request.query, name)


def offered_protocols(request: web.Request) -> list[str]:
    out: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        out += [p.strip() for p in value.split(",") if p.strip()]
    return out


def is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in (
        request.headers.get("Connection", "").lower()
    )


def pick_container(
    pod: dict[str, Any], requested: str | None
) -> tuple[dict[str, Any] | None, web.Response | None]:
    meta = pod.get("metadata") or {}
    containers = (pod.get("spec") or {}).get("containers") or []
    name = meta.get("name", "")
    if not requested:
        if len(containers) == 1:
            return containers[0], None
        names = " ".join(c.get("name", "") for c in containers)
        return None, bad_request(
            f"a container name must be specified for pod {name}, choose one of: [{names}]"
        )
    # Any container of the pod may be named: ephemeral ones too (kubectl debug -it attaches to its own).
    spec = pod.get("spec") or {}
    for c in [*containers, *(spec.get("initContainers") or []), *(spec.get("ephemeralContainers") or [])]:
        if c.get("name") == requested:
            return c, None
    return None, bad_request(f"container {requested} is not valid for pod {name}")


async def upgrade(
    request: web.Request, supported: tuple[str, ...], *, allow_none: bool = True
) -> tuple[web.WebSocketResponse | None, str, web.Response | None]:
    """Do the WebSocket handshake with the first offered subprotocol we support (client's order)."""
    offered = offered_protocols(request)
    chosen = next((p for p in offered if p in supported), None)
    if chosen is None:
        if offered or not allow_none:
            # What the apiserver's wsstream handshake says; kubectl then retries over SPDY.
            return (
                None,
                "",
                bad_request(
                    f"unable to upgrade connection: requested protocol(s) are not supported: {offered}; "
                    f"supports {list(supported)}"
                ),
            )
        chosen = ""
    ws = web.WebSocketResponse(protocols=[chosen] if chosen else (), **WS_SETTINGS)
    await ws.prepare(request)
    return ws, chosen, None


class Channels:
    """Channel framing over one WebSocket; sends are serialised so frames never interleave."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = "base64" in protocol
        self.v5 = protocol == V5
        self.status_json = protocol in (V5, V4, V4_BASE64)
        self._lock = asyncio.Lock()

    async def send(self, channel: int, data: bytes) -> None:
        async with self._lock:
            if self.base64:
                await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                await self.ws.send_bytes(bytes([channel]) + data)

    def decode(self, msg: Any) -> tuple[int, bytes] | None:
        if msg.type == WSMsgType.BINARY and not self.base64:
            data: bytes = msg.data
            return (data[0], data[1:]) if data else None
        if msg.type == WSMsgType.TEXT and self.base64:
            text: str = msg.data
            if not text:
                return None
            try:
                return ord(text[0]) - ord("0"), base64.b64decode(text[1:])
            except ValueError:
                return None
        if msg.type == WSMsgType.BINARY and self.base64:
            # Tolerate binary frames on base64 protocols (the apiserver's wsstream does not care).
            data = msg.data
            return (data[0] - ord("0"), base64.b64decode(data[1:])) if data else None
        return None

    async def serve_input(self, on_stdin: StdinFn, on_resize: ResizeFn, on_close_stdin: CloseFn) -> None:
        """Consume client messages until the WebSocket closes (which is what ends this coroutine)."""
        async for msg in self.ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            decoded = self.decode(msg)
            if decoded is None:
                continue
            channel, payload = decoded
            if channel == STDIN:
                if payload:
                    await on_stdin(payload)
            elif channel == RESIZE:
                for w, h in parse_resize(payload):
                    on_resize(w, h)
            elif self.v5 and channel == STREAM_CLOSE and payload[:1] == bytes([STDIN]):
                on_close_stdin()

    async def finish(self, status: dict[str, Any] | None, text_error: str | None = None) -> None:
        """Write the final status (v4/v5 JSON, v1 plain text) and close normally."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            if self.status_json and status is not None:
                await self.send(ERROR, json.dumps(status, separators=(",", ":")).encode())
            elif not self.status_json and text_error:
                await self.send(ERROR, text_error.encode())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=10)


def _remotecommand_opts(request: web.Request) -> tuple[bool, bool, bool, bool]:
    stdin, stdout, stderr, tty = (_flag(request, n) for n in ("stdin", "stdout", "stderr", "tty"))
    if tty and stderr:
        stderr = False  # the kubelet bypasses stderr in tty mode: the pty merges it into stdout
    return stdin, stdout, stderr, tty


# ---------------------------------------------------------------------------------------------------
# SPDY/3.1: byte pipes (WebSocket-tunnelled or a raw upgraded HTTP/1.1 connection) and sessions
# ---------------------------------------------------------------------------------------------------
class BytePipe(Protocol):
    async def recv(self) -> bytes: ...  # b"" once the peer is gone

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class WebSocketPipe:
    """SPDY frames tunnelled in binary WebSocket messages (message boundaries carry no meaning)."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        while True:
            msg = await self.ws.receive()
            if msg.type == WSMsgType.BINARY:
                if msg.data:
                    return bytes(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return b""

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=5)


class _Feeder:
    """Takes the place of aiohttp's HTTP parser once the connection is upgraded: raw bytes to a buffer.

    aiohttp only knows WebSocket upgrades, so its own StreamReader (which pauses the HTTP parser) cannot
    be used; backpressure is applied on the asyncio transport directly.
    """

    LIMIT = 256 * 1024

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.eof = False
        self.paused = False
        self.ready = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.buf += data
        self.ready.set()
        if len(self.buf) > self.LIMIT and not self.paused:
            self.paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()
        return False, b""

    def feed_eof(self) -> None:
        self.eof = True
        self.ready.set()

    async def read(self) -> bytes:
        while not self.buf and not self.eof:
            self.ready.clear()
            await self.ready.wait()
        data = bytes(self.buf)
        self.buf.clear()
        if self.paused:
            self.paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
        return data


class UpgradedPipe:
    """An HTTP/1.1 connection taken over after '101 Switching Protocols' with ``Upgrade: SPDY/3.1``.

    This is what kubectl falls back to when the WebSocket attempt fails (and what every client-go SPDY
    executor, older kubectl and KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false use): the request is a ``POST``
    with ``X-Stream-Protocol-Version`` headers; the answer names the chosen one.
    """

    def __init__(self, response: web.StreamResponse, reader: _Feeder) -> None:
        self.response = response
        self.reader = reader

    @classmethod
    async def accept(cls, request: web.Request, protocol: str) -> UpgradedPipe:
        headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
        if protocol:
            headers["X-Stream-Protocol-Version"] = protocol
        resp = web.StreamResponse(status=101, headers=headers)
        resp.force_close()  # when the handler returns, aiohttp closes the connection
        await resp.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost during the upgrade")
        reader = _Feeder(transport)
        request.protocol.set_parser(reader)  # type: ignore[arg-type]
        return cls(resp, reader)

    async def recv(self) -> bytes:
        return await self.reader.read()

    async def send(self, data: bytes) -> None:
        await self.response.write(data)  # status 101 has no body framing: these are the raw bytes

    async def close(self) -> None:
        return None  # the handler returning closes the connection (force_close)


def is_spdy_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower().startswith("spdy/3.1")


def spdy_protocols(request: web.Request) -> list[str]:
    out: list[str] = []
    for value in request.headers.getall("X-Stream-Protocol-Version", []):
        out += [p.strip() for p in value.split(",") if p.strip()]
    return out


async def accept_spdy(
    request: web.Request, supported: tuple[str, ...]
) -> tuple[UpgradedPipe | None, str, web.Response | None]:
    """httpstream.Handshake: the first client protocol the server knows; none offered = legacy v1."""
    offered = spdy_protocols(request)
    chosen = next((p for p in offered if p in supported), None)
    if chosen is None:
        if offered:
            return (
                None,
                "",
                status_response(
                    403,
                    "Forbidden",
                    f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                    f"server supports {list(supported)}",
                ),
            )
        chosen = ""
    return await UpgradedPipe.accept(request, chosen), chosen, None


SPDY_REMOTECOMMAND_PROTOCOLS = (V4, "v3.channel.k8s.io", "v2.channel.k8s.io", V1)
SPDY_STREAM_CHANNELS = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}
# How long the kubelet waits for the client to open all the streams it asked for.
STREAM_CREATION_TIMEOUT = 30.0


class SpdySession:
    """The kubelet's SPDY remote-command server: one SPDY stream per stdio channel.

    client-go creates, in order, the ``error``, ``stdin``, ``stdout``, ``stderr`` and (tty, v3+)
    ``resize`` streams (header ``streamtype``), waiting for our SYN_REPLY to each; stdin EOF is a FIN on
    the stdin stream. At the end: FIN on stdout/stderr, the status on the error stream + FIN, GOAWAY.
    """

    def __init__(self, pipe: BytePipe, protocol: str, expected: set[str]) -> None:
        self.pipe = pipe
        self.protocol = protocol
        self.status_json = protocol == V4
        self.expected = expected
        self.framer = spdy.SpdyFramer()
        self.ids: dict[int, int] = {}  # channel -> stream id
        self.channels: dict[int, int] = {}  # stream id -> channel
        self.backlog: list[spdy.Frame] = []
        self.finished: set[int] = set()
        self._lock = asyncio.Lock()
        self._gone = asyncio.Event()

    async def _write(self, build: Callable[[], bytes]) -> None:
        async with self._lock:  # header blocks share a zlib stream: build and send in one step
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.pipe.send(build())

    async def _recv_frames(self) -> list[spdy.Frame] | None:
        data = await self.pipe.recv()
        if not data:
            self._gone.set()
            return None
        try:
            return self.framer.feed(data)
        except spdy.SpdyProtocolError:
            await self._write(lambda: self.framer.goaway(0, 1))
            self._gone.set()
            return None

    async def _control(self, frame: spdy.ControlFrame) -> None:
        if frame.type == spdy.PING:
            await self._write(lambda: self.framer.ping(frame.ping_id))
        elif frame.type == spdy.GOAWAY:
            self._gone.set()

    async def setup(self) -> bool:
        """Accept the client's streams; False if they did not all arrive in time."""

        async def collect() -> bool:
            while not self.expected.issubset(SPDY_STREAM_NAMES.get(c, "") for c in self.ids):
                frames = await self._recv_frames()
                if frames is None:
                    return False
                for f in frames:
                    if isinstance(f, spdy.ControlFrame) and f.type == spdy.SYN_STREAM:
                        kind = (f.headers.get("streamtype") or [""])[0]
                        await self._write(functools.partial(self.framer.syn_reply, f.stream_id))
                        if kind in SPDY_STREAM_CHANNELS:
                            ch = SPDY_STREAM_CHANNELS[kind]
                            self.ids[ch] = f.stream_id
                            self.channels[f.stream_id] = ch
                        else:
                            await self._write(functools.partial(self.framer.rst_stream, f.stream_id))
                    elif isinstance(f, spdy.ControlFrame):
                        await self._control(f)
                    else:
                        self.backlog.append(f)  # stdin that raced ahead of the last SYN_STREAM
            return True

        try:
            return await asyncio.wait_for(collect(), STREAM_CREATION_TIMEOUT)
        except TimeoutError:
            return False

    async def send(self, channel: int, data: bytes) -> None:
        sid = self.ids.get(channel)
        if sid is not None and sid not in self.finished and data:
            await self._write(lambda: self.framer.data(sid, data))

    async def serve_input(self, on_stdin: StdinFn, on_resize: ResizeFn, on_close_stdin: CloseFn) -> None:
        resize_buf = b""
        pending: list[spdy.Frame] = self.backlog
        self.backlog = []
        while True:
            for f in pending:
                if isinstance(f, spdy.ControlFrame):
                    if f.type == spdy.SYN_STREAM:  # nothing more is expected: refuse
                        await self._write(
                            functools.partial(self.framer.rst_stream, f.stream_id, spdy.RST_REFUSED_STREAM)
                        )
                    elif f.type == spdy.RST_STREAM and self.channels.get(f.stream_id) == STDIN:
                        on_close_stdin()
                    else:
                        await self._control(f)
                    continue
                ch = self.channels.get(f.stream_id)
                if ch == STDIN:
                    if f.data:
                        await on_stdin(f.data)
                    if f.fin:
                        on_close_stdin()
                elif ch == RESIZE:
                    resize_buf += f.data
                    # The resize stream is a sequence of JSON objects (a json.Decoder on the kubelet side).
                    end = resize_buf.rfind(b"}")
                    if end >= 0:
                        for w, h in parse_resize(resize_buf[: end + 1]):
                            on_resize(w, h)
                        resize_buf = resize_buf[end + 1 :]
            if self._gone.is_set():
                return
            frames = await self._recv_frames()
            if frames is None:
                return
            pending = frames

    async def _fin(self, channel: int, data: bytes = b"") -> None:
        sid = self.ids.get(channel)
        if sid is not None and sid not in self.finished:
            self.finished.add(sid)
            await self._write(lambda: self.framer.data(sid, data, fin=True))

    async def finish(self, status: dict[str, Any] | None, text_error: str | None = None) -> None:
        await self._fin(STDOUT)
        await self._fin(STDERR)
        if self.status_json and status is not None:
            await self._fin(ERROR, json.dumps(status, separators=(",", ":")).encode())
        else:
            await self._fin(ERROR, (text_error or "").encode())
        await self._write(lambda: self.framer.goaway(max(self.channels, default=0)))
        # Give the client the chance to read everything and hang up first (like the apiserver's finish).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), timeout=10)
        await self.pipe.close()


SPDY_STREAM_NAMES = {v: k for k, v in SPDY_STREAM_CHANNELS.items()}


def spdy_expected_streams(protocol: str, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> set[str]:
    expected = {"error"}
    if stdin:
        expected.add("stdin")
    if stdout:
        expected.add("stdout")
    if stderr and not tty:
        expected.add("stderr")
    if tty and protocol in (V4, "v3.channel.k8s.io"):
        expected.add("resize")
    return expected


async def open_session(
    request: web.Request, stdin: bool, stdout: bool, stderr: bool, tty: bool
) -> tuple[Session | None, web.StreamResponse]:
    """Upgrade to whatever the client asked for (WebSocket or SPDY); (None, error response) on failure."""
    if is_websocket(request):
        ws, protocol, err = await upgrade(request, REMOTECOMMAND_PROTOCOLS)
        if err:
            return None, err
        assert ws is not None
        ch = Channels(ws, protocol)
        # The apiserver/kubelet announce readiness with an empty message on the lowest writable channel.
        await ch.send(STDOUT if stdout else STDERR if stderr else ERROR, b"")
        return ch, ws
    if is_spdy_upgrade(request):
        pipe, protocol, err = await accept_spdy(request, SPDY_REMOTECOMMAND_PROTOCOLS)
        if err:
            return None, err
        assert pipe is not None
        session = SpdySession(pipe, protocol, spdy_expected_streams(protocol, stdin, stdout, stderr, tty))
        if not await session.setup():
            return None, pipe.response
        return session, pipe.response
    return None, bad_request("Upgrade request required")


# ---------------------------------------------------------------------------------------------------
# exec
# ---------------------------------------------------------------------------------------------------
async def handle_exec(request: web.Request, runtime: PodRuntime, pod: dict[str, Any]) -> web.StreamResponse:
    spec, err = pick_container(pod, request.query.get("container"))
    if err:
        return err
    assert spec is not None
    command = request.query.getall("command", [])
    stdin, stdout, stderr, tty = _remotecommand_opts(request)
    if not command:
        return bad_request("you must specify at least one command for the container")
    if not (stdin or stdout or stderr):
        return bad_request("you must specify at least 1 of stdin, stdout, stderr")
    meta = pod.get("metadata") or {}
    p = runtime.pod(meta.get("namespace") or "default", meta.get("name", ""))
    c = p.containers.get(spec["name"]) if p else None
    if runtime.unconfined is not None:
        return bad_request(f"unable to upgrade connection: {runtime.unconfined}")
    if p is None or c is None or not c.running:
        return bad_request(f'unable to upgrade connection: container not found ("{spec["name"]}")')
    ch, resp = await open_session(request, stdin, stdout, stderr, tty)
    if ch is None:
        return resp
    try:
        env = runtime.container_env(p, spec)
        proc = await runtime.spawn(
            p, command, env, workdir=spec.get("workingDir") or "/", stdin=stdin, tty=tty
        )
    except ExecError as exc:
        msg = runc_exec_error(str(exc))
        await ch.finish(internal_error_status(msg), f"Internal error occurred: {msg}")
        return resp
    p.execs.add(proc)
    try:
        await _run_session(ch, proc, stdout=stdout, stderr=stderr, tty=tty)
    finally:
        p.execs.discard(proc)
        proc.kill()
        with contextlib.suppress(Exception):
            await proc.proc.wait()
        proc.close_fds()
    return resp


async def _pump_out(ch: Session, fd: int | None, channel: int, wanted: bool) -> None:
    if fd is None:
        return
    while True:
        chunk = await read_fd(fd)
        if not chunk:
            return
        if wanted:
            await ch.send(channel, chunk)  # awaits the socket: a slow client slows the process


async def _run_session(ch: Session, proc: Process, *, stdout: bool, stderr: bool, tty: bool) -> None:
    async def write_stdin(data: bytes) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                await write_fd(proc.stdin, data)

    pumps = [
        asyncio.create_task(_pump_out(ch, proc.stdout, STDOUT, stdout or tty)),
        asyncio.create_task(_pump_out(ch, proc.stderr, STDERR, stderr)),
    ]
    client = asyncio.create_task(ch.serve_input(write_stdin, proc.resize, proc.close_stdin))
    waiter = asyncio.create_task(proc.proc.wait())
    try:
        await asyncio.wait({client, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            return  # the client went away: the finally in the caller kills the process
        rc = waiter.result()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), timeout=DRAIN_AFTER_EXIT)
        rc = rc if rc >= 0 else 128 - rc
        text = None if rc == 0 else f"command terminated with non-zero exit code: exit status {rc}"
        await ch.finish(exit_status(rc), text)
    finally:
        for t in (*pumps, client, waiter):
            t.cancel()
        await asyncio.gather(*pumps, client, waiter, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------
# attach
# ---------------------------------------------------------------------------------------------------
async def handle_attach(request: web.Request, runtime: PodRuntime, pod: dict[str, Any]) -> web.StreamResponse:
    spec, err = pick_container(pod, request.query.get("container"))
    if err:
        return err
    assert spec is not None
    stdin, stdout, stderr, tty = _remotecommand_opts(request)
    if not (stdin or stdout or stderr):
        return bad_request("you must specify at least 1 of stdin, stdout, stderr")
    meta = pod.get("metadata") or {}
    p = runtime.pod(meta.get("namespace") or "default", meta.get("name", ""))
    c = p.containers.get(spec["name"]) if p else None
    if runtime.unconfined is not None:
        return bad_request(f"unable to upgrade connection: {runtime.unconfined}")
    if p is None or c is None or not c.running or c.process is None:
        return bad_request(f'unable to upgrade connection: container not found ("{spec["name"]}")')
    ch, resp = await open_session(request, stdin, stdout, stderr, tty)
    if ch is None:
        return resp
    await _attach_session(ch, runtime, c, stdin=stdin, stdout=stdout, stderr=stderr)
    return resp


async def _attach_session(
    ch: Session, runtime: PodRuntime, c: Container, *, stdin: bool, stdout: bool, stderr: bool
) -> None:
    proc = c.process
    assert proc is not None
    queue = runtime.subscribe(c)

    async def write_stdin(data: bytes) -> None:
        if stdin and proc.stdin is not None:
            async with c.stdin_lock:
                with contextlib.suppress(OSError):
                    await write_fd(proc.stdin, data)

    def close_stdin() -> None:
        # Only stdinOnce containers lose stdin when an attached client closes it (kubelet semantics).
        if c.spec.get("stdinOnce"):
            proc.close_stdin()

    async def forward() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            channel, data = item
            if (channel == STDOUT and stdout) or (channel == STDERR and stderr):
                await ch.send(channel, data)
            elif channel == STDERR and stdout and proc.tty:
                await ch.send(STDOUT, data)

    out = asyncio.create_task(forward())
    client = asyncio.create_task(ch.serve_input(write_stdin, proc.resize, close_stdin))
    try:
        await asyncio.wait({out, client}, return_when=asyncio.FIRST_COMPLETED)
        if out.done():
            # The container exited: attach ends like the kubelet's (a Success status).
            await ch.finish({"metadata": {}, "status": "Success"})
    finally:
        runtime.unsubscribe(c, queue)
        for t in (out, client):
            t.cancel()
        await asyncio.gather(out, client, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------
# port-forward
# ---------------------------------------------------------------------------------------------------
def _ports_query(request: web.Request) -> list[int] | None:
    # PodPortForwardOptions.Ports (Convert_Slice_string_To_Slice_int32): every `ports` value, split on `,`,
    # each part strconv.ParseUint(part, 10, 16) — nothing trimmed or skipped. The API server builds the
    # kubelet's `port` parameters itself, so a client's own `port` is ignored.
    ports: list[int] = []
    for value in request.query.getall("ports", []):
        for part in value.split(","):
            if not (part.isascii() and part.isdigit()) or not 0 < int(part) < 65536:
                return None
            ports.append(int(part))
    return ports


def forward_error(p: Pod, port: int) -> str:
    return (
        f"error forwarding port {port} to pod {p.uid}, uid : failed to connect to localhost:{port} inside "
        f"the pod: dial tcp4 127.0.0.1:{port}: connect: connection refused"
    )


async def handle_portforward(
    request: web.Request, runtime: PodRuntime, pod: dict[str, Any]
) -> web.StreamResponse:
    meta = pod.get("metadata") or {}
    p = runtime.pod(meta.get("namespace") or "default", meta.get("name", ""))
    if p is None:
        return bad_request(f"pod {meta.get('name')} is not running")
    if is_spdy_upgrade(request):
        pipe, _, err = await accept_spdy(request, (PORTFORWARD_SPDY,))
        if err:
            return err
        assert pipe is not None
        await SpdyPortForward(pipe, runtime, p).run()
        return pipe.response
    if not is_websocket(request):
        return bad_request("Upgrade request required")
    offered = offered_protocols(request)
    if SPDY_TUNNEL in offered:
        ws, _, err = await upgrade(request, (SPDY_TUNNEL,))
        if err:
            return err
        assert ws is not None
        await SpdyPortForward(WebSocketPipe(ws), runtime, p).run()
        return ws
    ports = _ports_query(request)
    if ports is None:
        return bad_request('invalid port in query parameter "ports"')
    if not ports:
        return bad_request('query parameter "port" is required')
    ws, protocol, err = await upgrade(request, PORTFORWARD_CHANNEL_PROTOCOLS)
    if err:
        return err
    assert ws is not None
    await _channel_portforward(Channels(ws, protocol), runtime, p, ports)
    return ws


async def _channel_portforward(ch: Channels, runtime: PodRuntime, p: Pod, ports: list[int]) -> None:
    """The kubelet's WebSocket port-forward: one TCP connection per requested port for the socket's life."""
    loop = asyncio.get_running_loop()
    # Resolved once the pod connection for port i is up (None if it failed): client bytes that arrive
    # earlier wait for it instead of being dropped.
    writers: dict[int, asyncio.Future[asyncio.StreamWriter | None]] = {
        i: loop.create_future() for i in range(len(ports))
    }
    for i, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        await ch.send(2 * i, prefix)
        await ch.send(2 * i + 1, prefix)

    async def forward(i: int, port: int) -> None:
        addr = runtime.port_address(p.namespace, p.name, port)
        try:
            if addr is None:
                raise ConnectionRefusedError
            reader, writer = await asyncio.open_connection(*addr)
        except OSError:
            writers[i].set_result(None)
            await ch.send(2 * i + 1, forward_error(p, port).encode())
            return
        writers[i].set_result(writer)
        try:
            while chunk := await reader.read(32 * 1024):
                await ch.send(2 * i, chunk)
        except OSError as exc:
            await ch.send(2 * i + 1, f"error forwarding port {port}: {exc}".encode())
        finally:
            writer.close()

    tasks = [asyncio.create_task(forward(i, port)) for i, port in enumerate(ports)]

    async def on_message() -> None:
        async for msg in ch.ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            decoded = ch.decode(msg)
            if decoded is None:
                continue
            channel, payload = decoded
            if channel % 2 == 0 and channel // 2 < len(ports):
                w = await writers[channel // 2]
                if w is not None and payload:
                    with contextlib.suppress(OSError):
                        w.write(payload)
                        await w.drain()

    async def all_forwarded() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)

    client = asyncio.create_task(on_message())
    done_all = asyncio.create_task(all_forwarded())
    try:
        await asyncio.wait({client, done_all}, return_when=asyncio.FIRST_COMPLETED)
        if not client.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.ws.close(), timeout=10)
    finally:
        client.cancel()
        done_all.cancel()
        for t in tasks:
            t.cancel()
        for fut in writers.values():
            if not fut.done():
                fut.cancel()
            elif (w := fut.result()) is not None:
                w.close()
        await asyncio.gather(client, done_all, *tasks, return_exceptions=True)


class _PFStream:
    def __init__(self, stream_id: int, kind: str, port: int, request_id: str) -> None:
        self.id = stream_id
        self.kind = kind
        self.port = port
        self.request_id = request_id
        self.remote_closed = False  # client sent FIN
        self.local_closed = False  # we sent FIN


class _PFPair:
    def __init__(self) -> None:
        self.data: _PFStream | None = None
        self.error: _PFStream | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.pending: list[bytes] = []


class SpdyPortForward:
    """Server side of kubectl's tunnelled SPDY port-forward (what the kubelet's httpstream handler does).

    kubectl opens, per accepted local connection, an ``error`` stream and then a ``data`` stream carrying
    the same ``requestid`` and ``port`` headers; we SYN_REPLY each at once (client-go waits for the reply),
    connect the pair to the pod port, copy bytes both ways, and when the pod side ends send FIN on the data
    stream and then on the error stream (client-go reads the error stream to EOF before it lets go).
    """

    def __init__(self, pipe: BytePipe, runtime: PodRuntime, pod: Pod) -> None:
        self.pipe = pipe
        self.runtime = runtime
        self.pod = pod
        self.framer = spdy.SpdyFramer()
        self.streams: dict[int, _PFStream] = {}
        self.pairs: dict[str, _PFPair] = {}
        # Header blocks share one zlib context: frames must hit the wire in the order they were built.
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def _send(self, build: Any) -> None:
        async with self._send_lock:
            if self._closed:
                return
            frame: bytes = build()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.pipe.send(frame)

    async def run(self) -> None:
        try:
            while not self._closed:
                data = await self.pipe.recv()
                if not data:
                    break
                try:
                    frames = self.framer.feed(data)
                except spdy.SpdyProtocolError:
                    await self._send(lambda: self.framer.goaway(0, 1))
                    break
                for frame in frames:
                    await self._handle(frame)
        finally:
            self._closed = True
            for pair in self.pairs.values():
                if pair.task:
                    pair.task.cancel()
                if pair.writer:
                    pair.writer.close()
            await asyncio.gather(*(pr.task for pr in self.pairs.values() if pr.task), return_exceptions=True)
            await self.pipe.close()

    async def _handle(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.DataFrame):
            await self._on_data(frame)
            return
        if frame.type == spdy.SYN_STREAM:
            await self._on_syn(frame)
        elif frame.type == spdy.RST_STREAM:
            s = self.streams.get(frame.stream_id)
            if s:
                pair = self.pairs.get(s.request_id)
                if pair:
                    self._drop(pair)
        elif frame.type == spdy.PING:
            await self._send(lambda: self.framer.ping(frame.ping_id))
        elif frame.type == spdy.GOAWAY:
            self._closed = True
        # SETTINGS, WINDOW_UPDATE, HEADERS: spdystream does no flow control; nothing to do.

    async def _on_syn(self, frame: spdy.ControlFrame) -> None:
        h = {k.lower(): v[0] for k, v in frame.headers.items() if v}
        kind, port_s, request_id = h.get("streamtype", ""), h.get("port", ""), h.get("requestid", "")
        await self._send(lambda: self.framer.syn_reply(frame.stream_id))
        if kind not in ("data", "error") or not port_s.isdigit() or not request_id:
            await self._send(lambda: self.framer.rst_stream(frame.stream_id, spdy.RST_PROTOCOL_ERROR))
            return
        s = _PFStream(frame.stream_id, kind, int(port_s), request_id)
        s.remote_closed = frame.fin
        self.streams[s.id] = s
        pair = self.pairs.setdefault(request_id, _PFPair())
        setattr(pair, kind, s)
        if pair.data and pair.error and pair.task is None:
            pair.task = asyncio.create_task(self._forward(pair))

    async def _on_data(self, frame: spdy.DataFrame) -> None:
        s = self.streams.get(frame.stream_id)
        if s is None:
            # A late half-close (or data) for a pair that already finished: spdystream drops these too.
            return
        pair = self.pairs.get(s.request_id)
        if s.kind != "data" or pair is None:
            s.remote_closed = s.remote_closed or frame.fin
            return  # client-go never writes to the error stream; it only half-closes it
        if pair.writer is None:
            # Bytes that arrive before the pod connection is up are kept (bounded by what the client
            # sends before our connect finishes: one read's worth in practice).
            await pair.connected.wait()
        w = pair.writer
        if w is not None:
            try:
                if frame.data:
                    w.write(frame.data)
                    await w.drain()
                if frame.fin and w.can_write_eof():
                    w.write_eof()  # half-close toward the pod, like net.TCPConn.CloseWrite
            except OSError:
                pass
        s.remote_closed = s.remote_closed or frame.fin

    def _drop(self, pair: _PFPair) -> None:
        if pair.writer:
            pair.writer.close()
        if pair.task:
            pair.task.cancel()
        for s in (pair.data, pair.error):
            if s:
                self.streams.pop(s.id, None)
        if pair.data:
            self.pairs.pop(pair.data.request_id, None)

    async def _fin(self, s: _PFStream, payload: bytes = b"") -> None:
        if not s.local_closed:
            s.local_closed = True
            await self._send(lambda: self.framer.data(s.id, payload, fin=True))

    async def _forward(self, pair: _PFPair) -> None:
        assert pair.data is not None and pair.error is not None
        data, error = pair.data, pair.error
        addr = self.runtime.port_address(self.pod.namespace, self.pod.name, data.port)
        try:
            if addr is None:
                raise ConnectionRefusedError
            reader, pair.writer = await asyncio.open_connection(*addr)
        except OSError:
            pair.connected.set()
            await self._fin(error, forward_error(self.pod, data.port).encode())
            await self._fin(data)
            return
        pair.connected.set()
        try:
            while chunk := await reader.read(32 * 1024):
                await self._send(lambda c=chunk: self.framer.data(data.id, c))
        except OSError as exc:
            await self._fin(error, f"error forwarding port {data.port}: {exc}".encode())
        finally:
            pair.writer.close()
        await self._fin(data)
        await self._fin(error)
        # Both directions are done: forget the pair so a long-lived tunnel does not accumulate them.
        self.streams.pop(data.id, None)
        self.streams.pop(error.id, None)
        self.pairs.pop(data.request_id, None)


__all__ = ["handle_attach", "handle_exec", "handle_portforward"]
