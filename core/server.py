"""Serving the gateway: uvicorn (httptools + wsproto) or Hypercorn, on uvloop, TLS on by default.

Both are ASGI servers running the same application. uvicorn is the default because it measured better on
the data path (docs/performance.md: its C HTTP/1.1 parser takes a third of the per-request cost off
Hypercorn's pure-Python h11); Hypercorn (`server: hypercorn`) adds HTTP/2, which kubectl uses when offered
but does not need.

With `workers: N` (N > 1) this process becomes a supervisor (:class:`Supervisor`): it binds the listener
once and forks N workers that each serve it exactly as a single process does, restarts one that dies,
passes SIGHUP on and stops them all on SIGTERM/SIGINT. It serves no request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import hypercorn.protocol
import hypercorn.protocol.h2
import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h2 import (
    BUFFER_HIGH_WATER,
    BUFFER_LOW_WATER,
    BufferCompleteError,
    H2Protocol,
    StreamBuffer,
)

from .config import check_readable, split_listen, worker_count
from .errors import ConfigError
from .gateway import Gateway, url_for_address
from .http1 import MAX_HEAD_BYTES, GatewayHttpToolsProtocol
from .tls import ensure_self_signed

log = logging.getLogger("kubegate")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path | None  # the CA clients must trust, when we generated it


def tls_files(gateway: Gateway) -> TLSFiles | None:
    tls = gateway.settings.tls
    if not tls.enabled:
        return None
    if tls.cert_file and tls.key_file:
        # Named here, one line: the TLS library's own error names neither the key nor the file.
        check_readable(gateway.config_path, "tls.cert_file", tls.cert_file)
        check_readable(gateway.config_path, "tls.key_file", tls.key_file)
        return TLSFiles(tls.cert_file, tls.key_file, None)
    hostnames = [*tls.hostnames]
    if gateway.settings.host not in ("0.0.0.0", "::", ""):
        hostnames.append(gateway.settings.host)
    files = ensure_self_signed(
        gateway.settings.state_dir / "tls", common_name="kubegate", hostnames=hostnames
    )
    return TLSFiles(files.cert, files.key, files.ca_cert)


def hypercorn_config(gateway: Gateway, tls: TLSFiles | None, bind: str | None = None) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [bind or gateway.settings.listen]
    if tls:
        config.certfile, config.keyfile = str(tls.cert), str(tls.key)
        config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.websocket_max_message_size = gateway.settings.limits.max_websocket_message_bytes
    # The API server's head limit (Go's MaxHeaderBytes, 1 MiB) on both protocols, not h11's 16 KiB and h2's
    # 64 KiB: a request with a large token works through either server as it does against the API server.
    # (HTTP/2: Go's serverConn.maxHeaderListSize, MaxHeaderBytes plus 32 bytes for each of 10 fields.)
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.h2_max_header_list_size = (1 << 20) + 10 * 32
    # Watches and `logs -f` are quiet for long stretches: no read timeout on the client side.
    config.read_timeout = None
    config.keep_alive_timeout = 75
    # Responses relay the API server's own Date header; a second one from Hypercorn would duplicate it.
    config.include_date_header = False
    config.include_server_header = False
    config.graceful_timeout = gateway.settings.shutdown_grace_seconds
    return config


class _H2Protocol(H2Protocol):
    """Hypercorn's HTTP/2, with its header list limit from the first request on. h2 gives its HPACK decoder
    MAX_HEADER_LIST_SIZE only once the client has acknowledged the server's SETTINGS, and kubectl sends its
    first request before that: a head over h2's default 64 KiB got GOAWAY ENHANCE_YOUR_CALM where Go's
    server, which applies its limit at once, takes 1 MiB."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection.decoder.max_header_list_size = self.config.h2_max_header_list_size

    async def _close_stream(self, stream_id: int) -> None:
        await super()._close_stream(stream_id)
        # A stream reset by the client, or on a connection that closed, is never written again: release a
        # `send` waiting for its window (the application is told of the disconnect; its further sends are
        # dropped). Hypercorn leaves the buffer to its sender, which on a closed connection has stopped:
        # the application, and the connection's task group with it, would wait forever.
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            await buffer.close()


class _FlowControlledStreamBuffer(StreamBuffer):
    """Hypercorn's buffer between an HTTP/2 stream's application and its sender, which releases the
    application only once what it holds falls below the low-water mark: `send` then waits while the client's
    flow-control window (the stream's or the connection's) is closed, as Go's server blocks the handler until
    its frame is written. Hypercorn's released it after every pop shorter than the mark, and its sender pops
    0 bytes from a stream without window: a client that opened none had whole responses buffered (10 streams
    of a 65 MB list: 135 -> 767 MB resident). The same buffer carries WebSockets over HTTP/2."""

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        while True:
            # Cleared before the check, so a pop in between is never missed.
            await self._paused.clear()
            if len(self.buffer) < BUFFER_HIGH_WATER or self._complete:
                return
            await self._paused.wait()

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


def _use_gateway_h2() -> None:
    """Serve HTTP/2 with `_H2Protocol`: Hypercorn's ProtocolWrapper looks the class up in its package, and
    H2Protocol makes each stream's buffer by the module's name `StreamBuffer`."""
    hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[misc]
    hypercorn.protocol.h2.StreamBuffer = _FlowControlledStreamBuffer  # type: ignore[misc]


def uvicorn_config(
    gateway: Gateway, tls: TLSFiles | None, bind: str | None = None, app: Any = None
) -> uvicorn.Config:
    host, _, port = (bind or gateway.settings.listen).rpartition(":")
    return uvicorn.Config(
        app or gateway,
        host=host.strip("[]"),
        port=int(port),
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        loop="none",  # the running loop (uvloop, see asyncio_run)
        # httptools, with the API server's limits on a request's head (431 past 1 MiB; 32 s to send it).
        http=GatewayHttpToolsProtocol,
        # wsproto accepts kubectl's `SPDY/3.1+portforward.k8s.io` subprotocol and the
        # websocket.http.response extension; it stops reading a socket until the app took each message.
        ws="wsproto",
        ws_max_size=gateway.settings.limits.max_websocket_message_bytes,
        ws_ping_interval=None,  # kubectl pings itself (every 5 s); answers are automatic
        lifespan="on",
        log_config=None,
        access_log=False,
        # Responses relay the API server's own Date header; a second one would duplicate it.
        date_header=False,
        server_header=False,
        timeout_keep_alive=75,
        # Whole seconds (uvicorn's type), rounded up; 0 stays 0 (cut at once) — `or None` made 0 and any
        # value below 1 wait without end.
        timeout_graceful_shutdown=math.ceil(gateway.settings.shutdown_grace_seconds),
    )


class _QuietUvicorn(logging.Filter):
    """uvicorn logs every WebSocket accept at INFO and warns about kubectl's SPDY upgrade attempts, which
    the gateway answers itself (see proxy._refuse_spdy); keep the log for what needs attention."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO and record.getMessage().endswith(("[accepted]", '" 403', '" 401')):
            return False
        return "Unsupported upgrade request" not in record.getMessage()


def run(gateway: Gateway, *, bind: str | None = None, announce: Callable[[str], Any] = print) -> None:
    """Serve until SIGINT/SIGTERM. `announce` prints where to reach the gateway."""
    if bind is not None:
        # `listen` was checked with the config; `--bind` is checked here, before anything binds or forks.
        check_address(bind, "--bind")
    host, port = check_address(bind or gateway.settings.listen)
    if port == 0:
        # "Any free port": chosen now, so that what is printed and put in kubeconfigs is what is served.
        port = _probe_bind(host, 0)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if bind is not None and not gateway.settings.public_url:
        # The URL printed, and put in kubeconfigs, is the one served: built from --bind, not `listen`.
        gateway.public_url = url_for_address(gateway.settings, host, port)
    workers = worker_count(gateway.settings)
    if workers > 1:
        Supervisor(gateway, workers, bind, announce).run()
        return
    check_bind(bind or gateway.settings.listen)
    tls = tls_files(gateway)
    logging.getLogger("uvicorn.error").addFilter(_QuietUvicorn())
    asyncio_run(serve_until_signal(gateway, tls, bind, on_ready=lambda: _banner(gateway, tls, announce)))


def _banner(gateway: Gateway, tls: TLSFiles | None, announce: Callable[[str], Any]) -> None:
    if tls and tls.ca:
        announce(f"kubegate: serving a certificate from its own CA; clients must trust {tls.ca}")
    announce(f"kubegate: serving {len(gateway.connections)} connection(s) on {gateway.public_url}")
    for connection in gateway.connections:
        upstream = connection.upstream.base_url
        announce(f"  {connection.name}: {gateway.connection_url(connection.name)} -> {upstream}")


def worker_conflicts(gateway: Gateway, workers: int) -> str | None:
    """Why `gateway`'s configuration cannot run in `workers` processes (None: it can). What is refused keeps
    state in one process or one local file that N processes would each keep, or fight over."""
    if workers <= 1:
        return None
    enabled = {name for connection in gateway.connections for name in connection.enabled_plugins}
    if "agents" in gateway.settings.plugins or any(c.type == "agent" for c in gateway.connections):
        # One SSH listener per host port, and an agent's tunnel ends in the one process that accepted it.
        return f"{gateway.config_path}: workers: agent connections need workers: 1 for now"
    for name, why in (
        ("audit-file", "its hash chain continues from the file's last line, under a lock of one process"),
        ("audit-webhook", "its spool directory is appended to and consumed by one process"),
    ):
        if name in enabled:
            return f"{gateway.config_path}: workers: {name} needs workers: 1 for now ({why}); audit-db works"
    return None


def check_address(address: str, source: str = "listening address") -> tuple[str, int]:
    """HOST and PORT of `address`; a one-line ConfigError (`--bind: '…': reason`) when it is not HOST:PORT."""
    try:
        return split_listen(address)
    except ValueError as exc:
        raise ConfigError(source, "", str(exc)) from None


def _probe_bind(host: str, port: int) -> int:
    """Bind `host`:`port` for a moment and let go: the port the OS gave (a free one for port 0), or OSError
    when it refuses (e.g. already in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        bound: int = probe.getsockname()[1]
    return bound


def check_bind(bind: str) -> None:
    """Fail early, with a one-line reason, when the address cannot be served: not HOST:PORT (ConfigError),
    or the OS refuses it (OSError, e.g. already in use)."""
    _probe_bind(*check_address(bind))


async def _when_listening(
    address: str, on_ready: Callable[[], None], started: Callable[[], bool] = lambda: True
) -> None:
    """Call `on_ready` once the server accepts connections (so what it prints is true when read). `started`
    must hold too: something else listening on the port (the server failed to bind it) is not us."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    while True:
        if started():
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                pass
            else:
                writer.close()
                on_ready()
                return
        await asyncio.sleep(0.05)


async def _when_started(on_ready: Callable[[], None], started: Callable[[], bool]) -> None:
    """A worker's readiness: its server has taken the inherited listener (a connection to the address would
    prove nothing, the supervisor's socket accepts it whoever serves)."""
    while not started():  # noqa: ASYNC110 - the servers expose a flag, not an event
        await asyncio.sleep(0.05)
    on_ready()


async def serve_until_signal(
    gateway: Gateway,
    tls: TLSFiles | None,
    bind: str | None = None,
    on_ready: Callable[[], None] | None = None,
    *,
    listener: socket.socket | None = None,
    workers: int = 1,
) -> None:
    """Serve with the configured server until SIGINT or SIGTERM, then stop the gateway cleanly. A worker of
    several serves `listener`, bound by the supervisor, instead of binding `bind` itself."""
    started: list[Callable[[], bool]] = [lambda: True]
    if listener is None:
        ready = asyncio.ensure_future(
            _when_listening(bind or gateway.settings.listen, on_ready or (lambda: None), lambda: started[0]())
        )
    else:
        ready = asyncio.ensure_future(_when_started(on_ready or (lambda: None), lambda: started[0]()))
    # Everything loaded so far (config, plugins, modules) lives as long as the process: keep it out of the
    # collector's way, and collect young objects less often (a few % of request time was GC).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    app = Reloadable(gateway, workers)
    loop = asyncio.get_running_loop()
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, app.reload_soon)
    publishing: asyncio.Future[None] | None = None
    if workers > 1:
        from .observe import publish_forever

        publishing = asyncio.ensure_future(publish_forever(lambda: app.current))
    try:
        if gateway.settings.server == "hypercorn":
            stop = asyncio.Event()
            grace = gateway.settings.shutdown_grace_seconds

            def stop_serving() -> None:
                if not stop.is_set():
                    _log_notice(app.open_kinds(), grace, uvicorn=False)
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop_serving)
            config = hypercorn_config(gateway, tls, f"fd://{listener.fileno()}" if listener else bind)
            _use_gateway_h2()
            if listener is not None:
                # Hypercorn has no "started" flag; with the socket already listening, serving follows the
                # lifespan startup at once.
                started[0] = lambda: app.current._app_started
            try:
                await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
            except Exception:
                if gateway.startup_error:
                    raise StartupError(gateway.startup_error) from None
                raise
        else:
            # uvicorn handles SIGINT/SIGTERM itself and re-raises the signal once it has shut down; these
            # handlers take that re-raised signal, so a stop is an orderly exit rather than an interrupt.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
            server = _UvicornServer(uvicorn_config(gateway, tls, bind, app), app)
            started[0] = lambda: server.started
            grace = gateway.settings.shutdown_grace_seconds
            announcing = asyncio.ensure_future(_announce_stop(server, app, grace))
            try:
                await server.serve(sockets=[listener] if listener is not None else None)
            except SystemExit:
                if not gateway.startup_error:
                    raise
            finally:
                announcing.cancel()
            if not server.started:
                if gateway.startup_error:
                    raise StartupError(gateway.startup_error)
                raise OSError(f"cannot serve on {bind or gateway.settings.listen}")
    finally:
        ready.cancel()
        if publishing is not None:
            publishing.cancel()
        if hasattr(signal, "SIGHUP"):
            loop.remove_signal_handler(signal.SIGHUP)
        for running in {gateway, app.current, *app.retiring}:
            await running.stop()  # no-op when the lifespan already stopped it


def request_kind(scope: Any) -> str:
    """What an open request is, in kubectl's words, for the shutdown message: exec, attach, port-forward
    (WebSocket sessions), watch, logs -f (streams), or request."""
    path = str(scope.get("path", "")).rstrip("/")
    if scope.get("type") == "websocket":
        last = path.rsplit("/", 1)[-1]
        return {"portforward": "port-forward"}.get(last, last if last in ("exec", "attach") else "session")
    query = scope.get("query_string", b"").decode("latin-1").lower()
    params = {part.partition("=")[0]: part.partition("=")[2] for part in query.split("&")}
    if params.get("watch") in ("1", "true") or "/watch/" in path:
        return "watch"
    if path.endswith("/log") and params.get("follow") in ("1", "true"):
        return "logs -f"
    return "request"


def shutdown_notice(open_kinds: list[str], grace_seconds: float, *, uvicorn: bool) -> str:
    """The line printed when a stop begins: what is still open, what the server does with it, how long it
    waits. uvicorn closes WebSocket sessions (exec, attach, port-forward) at once with code 1012 ("service
    restart"), and a second SIGINT stops it without waiting; HTTP streams (watch, logs -f) and requests may
    finish for up to `shutdown_grace_seconds`, then they are cut. Hypercorn waits for all of them."""
    if not open_kinds:
        return "stopping (no open requests)"
    sessions = [
        kind for kind in open_kinds if uvicorn and kind in ("exec", "attach", "port-forward", "session")
    ]
    others = [kind for kind in open_kinds if kind not in sessions]

    def summary(kinds: list[str], noun: str) -> str:
        counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
        detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return f"{len(kinds)} open {noun}{'' if len(kinds) == 1 else 's'} ({detail})"

    parts = []
    if others:
        parts.append(f"waiting up to {grace_seconds:g} s for {summary(others, 'request')} to end")
    if sessions:
        parts.append(f"closing {summary(sessions, 'session')}")
    hint = "; Ctrl-C again to stop now" if uvicorn and others else ""
    return "stopping: " + "; ".join(parts) + hint


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, noting what is open the moment a stop signal arrives: uvicorn closes WebSocket
    sessions at once, so a look taken afterwards (the notice below polls) could miss them."""

    def __init__(self, config: uvicorn.Config, app: Reloadable):
        super().__init__(config)
        self.reloadable = app
        self.open_at_stop: list[str] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.open_at_stop is None:
            self.open_at_stop = self.reloadable.open_kinds()
        super().handle_exit(sig, frame)


async def _announce_stop(server: _UvicornServer, app: Reloadable, grace: float) -> None:
    """Log `shutdown_notice` once the server begins to stop (uvicorn sets a flag; polled like uvicorn does),
    with what was open when the stop signal came."""
    while not server.should_exit:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.05)
    open_kinds = server.open_at_stop if server.open_at_stop is not None else app.open_kinds()
    _log_notice(open_kinds, grace, uvicorn=True)


def _log_notice(open_kinds: list[str], grace: float, *, uvicorn: bool) -> None:
    # A warning when something is cut short or waited for; an ordinary stop is information.
    level = logging.WARNING if open_kinds else logging.INFO
    log.log(level, "%s", shutdown_notice(open_kinds, grace, uvicorn=uvicorn))


class StartupError(Exception):
    """The gateway could not start (a plugin's or the database's reason)."""


class Reloadable:
    """The application the server runs: the current gateway, replaced by a freshly loaded one on SIGHUP.

    New requests go to the new configuration as soon as it has started; requests, watches and sessions
    already open stay with the old one, which stops once they are done (or after its
    `shutdown_grace_seconds`). A config that does not load or start is refused with a log line, and the
    running one stays. The listening address and TLS files belong to the server: changing them needs a
    restart (the log says so), and so does `workers`. A worker of several refuses a configuration that
    cannot run in several processes (:func:`worker_conflicts`)."""

    def __init__(self, gateway: Gateway, workers: int = 1):
        self.current = gateway
        self.workers = workers
        self.inflight: dict[int, int] = {}
        # Every open request's type, path and query, for the stop notice (classified then, not on the
        # request path; copied, as the application may rewrite its scope).
        self.open_requests: dict[int, tuple[Any, Any, Any]] = {}
        self.retiring: set[Gateway] = set()
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Future[Any]] = set()

    def reload_soon(self) -> None:
        """The SIGHUP handler."""
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        gateway = self.current
        key = id(gateway)
        self.inflight[key] = self.inflight.get(key, 0) + 1
        marker = object()  # this request's key in open_requests, until its response is complete
        self.open_requests[id(marker)] = (scope["type"], scope.get("path"), scope.get("query_string"))

        remaining: list[int] = []  # bytes of a Content-Length still to send, once the response started

        async def tracked_send(message: Any) -> None:
            # A response's last part is on its way: the client may see it (and send a stop signal) before
            # the application returns, so it no longer counts as open. The last part is the one that
            # completes a Content-Length (Quart sends an empty `more_body: False` after it, a step later).
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-length" and value.isdigit():
                        remaining.append(int(value))
            elif message["type"] == "http.response.body":
                if remaining:
                    remaining[0] -= len(message.get("body", b""))
                if not message.get("more_body", False) or (remaining and remaining[0] <= 0):
                    self.open_requests.pop(id(marker), None)
            await send(message)

        try:
            await gateway(scope, receive, tracked_send if scope["type"] == "http" else send)
        finally:
            self.inflight[key] -= 1
            self.open_requests.pop(id(marker), None)

    def open_kinds(self) -> list[str]:
        """What the open requests are (`request_kind`), for the stop notice."""
        return [
            request_kind({"type": kind, "path": path or "", "query_string": query or b""})
            for kind, path, query in list(self.open_requests.values())
        ]

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        async def forwarded_receive() -> Any:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                for old in list(self.retiring):
                    await old.stop()
            return message

        await self.current(scope, forwarded_receive, send)

    async def reload(self) -> bool:
        from .config import ConfigError

        async with self._reloading:
            old = self.current
            try:
                new = Gateway.from_config(old.config_path, plugins=old.plugins)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays: %s", exc)
                return False
            conflict = worker_conflicts(new, self.workers)
            if conflict:
                log.error("reload refused, the running configuration stays: %s", conflict)
                return False
            try:
                await new.start()
            except Exception as exc:
                log.error("reload refused, the running configuration stays: cannot start it: %s", exc)
                await new.stop()
                return False
            for key in ("listen", "tls", "workers"):
                if getattr(new.settings, key) != getattr(old.settings, key):
                    log.warning("reload: `%s` changed; it takes effect at the next restart", key)
            self.current = new
            log.info(
                "configuration reloaded from %s: %d connection(s)", old.config_path, len(new.connections)
            )
            self.retiring.add(old)
            task = asyncio.ensure_future(self._retire(old))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True

    async def _retire(self, old: Gateway) -> None:
        deadline = time.monotonic() + old.settings.shutdown_grace_seconds
        # A counter, decremented wherever a request ends: polled rather than signalled.
        while self.inflight.get(id(old), 0) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        self.retiring.discard(old)
        self.inflight.pop(id(old), None)
        await old.stop()


# -- several workers ------------------------------------------------------------------------------------------

STOP_MARGIN_SECONDS = 15.0  # beyond shutdown_grace_seconds (audit sinks drain after the server stops)
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a worker that served this long before it died is restarted without delay build-up
SUPERVISOR_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


@dataclass
class _Worker:
    index: int
    pid: int
    status: int  # read end of the pipe the worker says "ready" or "error REASON" on; -1 once at EOF
    generation: int  # the configuration generation it serves (SIGHUPs it has been sent)
    forked_at: float
    ready: bool = False
    error: str = ""
    pending: bytes = field(default=b"", repr=False)


class Supervisor:
    """`workers: N`: one listening socket, N forked worker processes serving it.

    The supervisor binds the address, prepares what must happen once (the generated TLS files, the database
    schema), then forks. Each worker runs :func:`serve_until_signal` on the inherited socket, exactly as a
    single process serves; the kernel hands each new connection to one of them. The banner is printed once
    every worker serves. A worker that dies is forked again (the delay doubles from 0.5 s up to 30 s while
    they keep dying, and starts over after one that served a minute). SIGHUP: the supervisor loads the
    file again (the configuration later workers start with) and passes SIGHUP to every worker, which
    reloads as a single process does; one whose reload fails keeps its configuration and the others are
    not affected. SIGTERM/SIGINT: every worker stops gracefully (`shutdown_grace_seconds`), then the
    supervisor exits; one that has not stopped by the grace period plus 15 s is killed."""

    def __init__(
        self, gateway: Gateway, workers: int, bind: str | None, announce: Callable[[str], Any]
    ) -> None:
        self.template = gateway  # the configuration a worker is forked with (never started here)
        self.count = workers
        self.bind = bind or gateway.settings.listen
        self.announce = announce
        self.generation = 0
        self.workers: dict[int, _Worker] = {}  # by pid
        self.restarts: dict[int, float] = {}  # worker index -> when to fork it again
        self.failures: dict[int, int] = {}  # worker index -> deaths in a row
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        self.tls: TLSFiles | None = None
        self.listener: socket.socket | None = None
        self._wake_read = self._wake_write = -1
        self._stopping = False
        self._stop_requests = 0
        self._started_all = False  # every worker of the first round has served
        self._reaped_during_start: list[_Worker] = []

    # -- the supervisor's side -----------------------------------------------------------------------------

    def run(self) -> None:
        from .observe import MULTIPROCESS

        if not MULTIPROCESS:
            # The CLI sets PROMETHEUS_MULTIPROC_DIR before prometheus-client is imported; without it each
            # worker would count alone and /metrics would show one worker's share.
            raise StartupError("workers > 1 needs PROMETHEUS_MULTIPROC_DIR set before kubegate is imported")
        conflict = worker_conflicts(self.template, self.count)
        if conflict:
            raise StartupError(conflict)
        self.tls = tls_files(self.template)
        self._prepare_database()
        self.listener = self._listen()
        self._forget_own_metrics()
        logging.getLogger("uvicorn.error").addFilter(_QuietUvicorn())
        previous = {sig: signal.getsignal(sig) for sig in SUPERVISOR_SIGNALS}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, _note_signal)  # the wake-up pipe carries the signal to the loop below
        try:
            if self._start_all():
                self._started_all = True
                _banner(self.template, self.tls, self.announce)
                self.announce(
                    f"kubegate: {self.count} workers (pids {', '.join(str(p) for p in sorted(self.workers))})"
                )
                self._supervise()
        finally:
            self._stop_all()
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_read, self._wake_write):
                os.close(fd)
            self.listener.close()

    def _prepare_database(self) -> None:
        """Set up or check the schema once, before N workers would all try at the same moment (SQLite has no
        advisory lock to take turns with); the connections are closed so no worker inherits one."""
        from .db import DatabaseError

        try:
            self.template.database.create_tables()
        except DatabaseError as exc:
            raise StartupError(str(exc)) from None
        finally:
            self.template.database.close()

    def _listen(self) -> socket.socket:
        host, _, port = self.bind.rpartition(":")
        host = host.strip("[]")
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
            listener.bind((host, int(port)))
            listener.listen(2048)  # uvicorn's default backlog
        except OSError:
            listener.close()
            raise
        listener.set_inheritable(True)
        return listener

    def _forget_own_metrics(self) -> None:
        """prometheus-client opened files for this process when the metrics were defined; the supervisor
        serves nothing, so its (zero) series must not show among the workers'."""
        if not self.metrics_dir:
            return
        for path in Path(self.metrics_dir).glob(f"*_{os.getpid()}.db"):
            path.unlink(missing_ok=True)

    def _start_all(self) -> bool:
        """Fork every worker and wait until all serve. False when a stop signal came first; StartupError
        (the first worker's reason) when one cannot start — the others are stopped then."""
        for index in range(self.count):
            self._fork(index)
        while not all(w.ready for w in self.workers.values()) or len(self.workers) < self.count:
            if self._stopping:
                return False
            self._wait(None)
            failed = [w for w in self.workers.values() if w.error] + self._reaped_during_start
            if failed:
                raise StartupError(failed[0].error or f"worker {failed[0].index} exited during its startup")
        return True

    def _supervise(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            due = min(self.restarts.values(), default=None)
            self._wait(None if due is None else max(due - now, 0.0))
            now = time.monotonic()
            for index, when in list(self.restarts.items()):
                if when <= now and not self._stopping:
                    del self.restarts[index]
                    self._fork(index)

    def _wait(self, timeout: float | None) -> None:
        """Wait for a signal or a worker's word (or `timeout`), and act on what came."""
        poller = select.poll()  # not select(): 1,024 workers have pipe fds past FD_SETSIZE
        for fd in (self._wake_read, *(w.status for w in self.workers.values() if w.status >= 0)):
            poller.register(fd, select.POLLIN)
        readable = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
        if self._wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                for number in os.read(self._wake_read, 512):
                    self._on_signal(number)
        for worker in list(self.workers.values()):
            if worker.status in readable:
                self._read_status(worker)
        self._reap()

    def _on_signal(self, number: int) -> None:
        if number == signal.SIGHUP:
            self._reload()
        elif number in (signal.SIGTERM, signal.SIGINT):
            self._stop_requests += 1
            if not self._stopping:
                self._stopping = True
                log.info("stopping %d worker(s) (signal %s)", len(self.workers), signal.Signals(number).name)
                self._send_all(signal.SIGTERM)
            else:
                # A second request: uvicorn takes SIGINT after SIGTERM as "stop now, do not wait".
                log.warning("stopping the workers now, without waiting for open requests")
                self._send_all(signal.SIGINT)

    def _reload(self) -> None:
        from .config import ConfigError

        try:
            candidate = Gateway.from_config(self.template.config_path, plugins=self.template.plugins)
        except ConfigError as exc:
            log.error("reload: %s (workers keep their configuration; a new worker starts with the last good one)",
                      exc)  # fmt: skip
        else:
            conflict = worker_conflicts(candidate, self.count)
            if conflict:
                log.error("reload: %s (a new worker starts with the last good configuration)", conflict)
            else:
                self.template = candidate
        self.generation += 1
        for worker in self.workers.values():
            # A worker still starting has no reload handler yet; it is sent SIGHUP once it serves.
            if worker.ready:
                self._send(worker, signal.SIGHUP)
                worker.generation = self.generation

    def _read_status(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.status, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            os.close(worker.status)
            worker.status = -1
            return
        worker.pending += data
        *lines, worker.pending = worker.pending.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text == "ready":
                worker.ready = True
                log.info("worker %d (pid %d) serving", worker.index, worker.pid)
                if worker.generation < self.generation:  # a SIGHUP came while it was starting
                    self._send(worker, signal.SIGHUP)
                    worker.generation = self.generation
            elif text.startswith("error "):
                worker.error = text.removeprefix("error ")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.status >= 0:
                # Its last words (an "error" line) may still be in the pipe.
                os.set_blocking(worker.status, False)
                self._read_status(worker)
                if worker.status >= 0:
                    os.close(worker.status)
                    worker.status = -1
            self._forget_worker_metrics(pid)
            if self._stopping:
                continue
            how = _exit_description(status)
            if not self._started_all:
                self._reaped_during_start.append(worker)
                if not worker.error:
                    worker.error = f"worker {worker.index} (pid {pid}) {how} during its startup"
                continue
            served = time.monotonic() - worker.forked_at
            failures = 0 if worker.ready and served >= STABLE_SECONDS else self.failures.get(worker.index, 0)
            delay = min(FIRST_BACKOFF_SECONDS * 2**failures, MAX_BACKOFF_SECONDS)
            self.failures[worker.index] = failures + 1
            self.restarts[worker.index] = time.monotonic() + delay
            reason = f": {worker.error}" if worker.error else ""
            log.error("worker %d (pid %d) %s%s; starting it again in %.1f s", worker.index, pid, how, reason,
                      delay)  # fmt: skip

    def _forget_worker_metrics(self, pid: int) -> None:
        """Its gauges of what is open now go; its counters stay in the sums (they happened)."""
        if self.metrics_dir:
            from prometheus_client.multiprocess import mark_process_dead

            with contextlib.suppress(OSError):
                mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]  # untyped upstream

    def _send(self, worker: _Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def _send_all(self, sig: int) -> None:
        for worker in list(self.workers.values()):
            self._send(worker, sig)

    def _stop_all(self) -> None:
        """Stop every worker (they finish open requests within the grace period), killing stragglers."""
        self._stopping = True
        self.restarts.clear()
        if not self.workers:
            return
        if self._stop_requests == 0:  # stopping for another reason than a signal (a worker failed to start)
            self._send_all(signal.SIGTERM)
        deadline = time.monotonic() + self.template.settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        while self.workers and time.monotonic() < deadline:
            self._wait(min(deadline - time.monotonic(), 1.0))
        if self.workers:
            log.error("killing %d worker(s) that did not stop in time", len(self.workers))
            self._send_all(signal.SIGKILL)
            for pid in list(self.workers):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._forget_worker_metrics(pid)
                worker = self.workers.pop(pid)
                if worker.status >= 0:
                    os.close(worker.status)
        log.info("all workers stopped")

    # -- the worker's side ----------------------------------------------------------------------------------

    def _fork(self, index: int) -> None:
        status_read, status_write = os.pipe()
        parent = os.getpid()
        # Signals wait until the child has dropped the supervisor's handlers (and the parent its bookkeeping).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(status_read)
            os.close(status_write)
            raise
        if pid == 0:  # the worker
            code = 70
            try:
                os.close(status_read)
                for fd in (self._wake_read, self._wake_write, *(w.status for w in self.workers.values())):
                    if fd >= 0:
                        os.close(fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                # No reload before the server has its handler; the supervisor sends SIGHUP again once ready.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                _die_with_parent(parent)
                code = self._serve_as_worker(index, status_write)
            except BaseException:  # nothing may unwind into the supervisor's code in a child
                log.exception("worker %d failed", index)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        os.close(status_write)
        os.set_blocking(status_read, False)
        self.workers[pid] = _Worker(index, pid, status_read, self.generation, time.monotonic())
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _serve_as_worker(self, index: int, status: int) -> int:
        assert self.listener is not None
        gateway = self.template

        def say(text: str) -> None:
            with contextlib.suppress(OSError):
                os.write(status, (" ".join(text.split()) + "\n").encode())

        try:
            asyncio_run(
                serve_until_signal(
                    gateway,
                    self.tls,
                    self.bind,
                    on_ready=lambda: say("ready"),
                    listener=self.listener,
                    workers=self.count,
                )
            )
            return 0
        except StartupError as exc:
            say(f"error {exc}")
        except OSError as exc:
            say(f"error cannot serve on {self.bind}: {exc.strerror or exc}")
        except SystemExit as exc:
            say(f"error {gateway.startup_error or f'the server exited ({exc.code})'}")
        return 3


def _note_signal(_number: int, _frame: Any) -> None:
    """The supervisor's signal handler: nothing here, the signal number arrives through the wake-up fd."""


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this worker SIGTERM when the supervisor dies (even by SIGKILL), so no worker
    goes on serving without one that restarts, reloads and stops it."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the line above
        os._exit(0)


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def asyncio_run(coro: Coroutine[Any, Any, object]) -> None:
    """Run on uvloop when available (about 1.2x Hypercorn's asyncio worker here)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(coro)
        return
    if sys.version_info >= (3, 12):
        uvloop.run(coro)
    else:
        uvloop.install()
        asyncio.run(coro)
