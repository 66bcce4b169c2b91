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

A request that is not a WebSocket upgrade (kubectl's SPDY fallback: ``POST`` + ``Upgrade: SPDY/3.1``) is
answered with a Status error: the sandbox does not implement SPDY upgrades of plain HTTP connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import struct
from typing import Any

from aiohttp import WSMsgType, web

from kubegate.sandbox import spdy
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
PORTFORWARD_CHANNEL_PROTOCOLS = (V4, V4_BASE64, V1, V1_BASE64)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CLOSE = 0xFF
# How long output that is still in the pipes may take to arrive after the process exited (a background
# child holding the pipe open must not keep the session alive forever).
DRAIN_AFTER_EXIT = 2.0
# The apiserver's idle timeout for these connections is 4 h; client-go pings every 5 s, aiohttp answers.
WS_SETTINGS: dict[str, Any] = {"compress": False, "max_msg_size": 16 * 1024 * 1024, "autoping": True}


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
    return request.query.get(name, "").lower() in ("1", "true", "t", "yes", "y")


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
    for c in containers:
        if c.get("name") == requested:
            return c, None
    return None, bad_request(f"container {requested} is not valid for pod {name}")


def not_websocket_response(request: web.Request) -> web.Response:
    if request.headers.get("Upgrade", "").lower().startswith("spdy"):
        return bad_request(
            "unable to upgrade connection: the sandbox cluster serves exec, attach and port-forward over "
            "WebSockets only (SPDY/3.1 upgrades are not implemented)"
        )
    return bad_request("Upgrade request required")


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


async def _first_frame(ch: Channels, stdout: bool, stderr: bool) -> None:
    await ch.send(STDOUT if stdout else STDERR if stderr else ERROR, b"")


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
    if p is None or c is None or not c.running:
        return bad_request(f'unable to upgrade connection: container not found ("{spec["name"]}")')
    if not is_websocket(request):
        return not_websocket_response(request)
    ws, protocol, err = await upgrade(request, REMOTECOMMAND_PROTOCOLS)
    if err:
        return err
    assert ws is not None
    ch = Channels(ws, protocol)
    await _first_frame(ch, stdout, stderr)
    try:
        env = runtime.container_env(p, spec)
        proc = await runtime.spawn(
            p, command, env, workdir=spec.get("workingDir") or "/", stdin=stdin, tty=tty
        )
    except ExecError as exc:
        msg = runc_exec_error(str(exc))
        await ch.finish(internal_error_status(msg), f"Internal error occurred: {msg}")
        return ws
    p.execs.add(proc)
    try:
        await _run_session(ch, proc, stdout=stdout, stderr=stderr, tty=tty)
    finally:
        p.execs.discard(proc)
        proc.kill()
        with contextlib.suppress(Exception):
            await proc.proc.wait()
        proc.close_fds()
    return ws


async def _pump_out(ch: Channels, fd: int | None, channel: int, wanted: bool) -> None:
    if fd is None:
        return
    while True:
        chunk = await read_fd(fd)
        if not chunk:
            return
        if wanted:
            await ch.send(channel, chunk)  # awaits the socket: a slow client slows the process


async def _read_client(ch: Channels, on_stdin: Any, on_resize: Any, on_close_stdin: Any) -> None:
    """Consume client messages until the WebSocket closes (which is what ends this coroutine)."""
    async for msg in ch.ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return
        decoded = ch.decode(msg)
        if decoded is None:
            continue
        channel, payload = decoded
        if channel == STDIN:
            if payload:
                await on_stdin(payload)
        elif channel == RESIZE:
            for w, h in parse_resize(payload):
                on_resize(w, h)
        elif ch.v5 and channel == STREAM_CLOSE and payload[:1] == bytes([STDIN]):
            on_close_stdin()


async def _run_session(ch: Channels, proc: Process, *, stdout: bool, stderr: bool, tty: bool) -> None:
    async def write_stdin(data: bytes) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                await write_fd(proc.stdin, data)

    pumps = [
        asyncio.create_task(_pump_out(ch, proc.stdout, STDOUT, stdout or tty)),
        asyncio.create_task(_pump_out(ch, proc.stderr, STDERR, stderr)),
    ]
    client = asyncio.create_task(_read_client(ch, write_stdin, proc.resize, proc.close_stdin))
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
    stdin, stdout, stderr, _tty = _remotecommand_opts(request)
    if not (stdin or stdout or stderr):
        return bad_request("you must specify at least 1 of stdin, stdout, stderr")
    meta = pod.get("metadata") or {}
    p = runtime.pod(meta.get("namespace") or "default", meta.get("name", ""))
    c = p.containers.get(spec["name"]) if p else None
    if p is None or c is None or not c.running or c.process is None:
        return bad_request(f'unable to upgrade connection: container not found ("{spec["name"]}")')
    if not is_websocket(request):
        return not_websocket_response(request)
    ws, protocol, err = await upgrade(request, REMOTECOMMAND_PROTOCOLS)
    if err:
        return err
    assert ws is not None
    ch = Channels(ws, protocol)
    await _first_frame(ch, stdout, stderr)
    await _attach_session(ch, runtime, c, stdin=stdin, stdout=stdout, stderr=stderr)
    return ws


async def _attach_session(
    ch: Channels, runtime: PodRuntime, c: Container, *, stdin: bool, stdout: bool, stderr: bool
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
    client = asyncio.create_task(_read_client(ch, write_stdin, proc.resize, close_stdin))
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
    ports: list[int] = []
    for value in request.query.getall("ports", []) + request.query.getall("port", []):
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 0 < int(part) < 65536:
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
    if not is_websocket(request):
        return not_websocket_response(request)
    offered = offered_protocols(request)
    if SPDY_TUNNEL in offered:
        ws, _, err = await upgrade(request, (SPDY_TUNNEL,))
        if err:
            return err
        assert ws is not None
        await SpdyPortForward(ws, runtime, p).run()
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
    writers: dict[int, asyncio.StreamWriter] = {}
    tasks: list[asyncio.Task[None]] = []
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
            await ch.send(2 * i + 1, forward_error(p, port).encode())
            return
        writers[i] = writer
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
                w = writers.get(channel // 2)
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
        for w in writers.values():
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

    def __init__(self, ws: web.WebSocketResponse, runtime: PodRuntime, pod: Pod) -> None:
        self.ws = ws
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
            if self._closed or self.ws.closed:
                return
            frame: bytes = build()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(frame)

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                        break
                    continue
                try:
                    frames = self.framer.feed(msg.data)
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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), timeout=5)

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
