"""Serving the gateway: uvicorn (httptools + wsproto) or Hypercorn, on uvloop, TLS on by default.

Both are ASGI servers running the same application. uvicorn is the default because it measured better on
the data path (docs/performance.md: its C HTTP/1.1 parser takes a third of the per-request cost off
Hypercorn's pure-Python h11); Hypercorn (`server: hypercorn`) adds HTTP/2, which kubectl uses when offered
but does not need.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from .gateway import Gateway
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
    # Watches and `logs -f` are quiet for long stretches: no read timeout on the client side.
    config.read_timeout = None
    config.keep_alive_timeout = 75
    # Responses relay the API server's own Date header; a second one from Hypercorn would duplicate it.
    config.include_date_header = False
    config.include_server_header = False
    config.graceful_timeout = gateway.settings.shutdown_grace_seconds
    return config


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
        http="httptools",
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
        timeout_graceful_shutdown=int(gateway.settings.shutdown_grace_seconds) or None,
    )


class _QuietUvicorn(logging.Filter):
    """uvicorn logs every WebSocket accept at INFO and warns about kubectl's SPDY upgrade attempts, which
    the gateway answers itself (see proxy._refuse_spdy); keep the log for what needs attention."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO and record.getMessage().endswith(("[accepted]", '" 403', '" 401')):
            return False
        return "Unsupported upgrade request" not in record.getMessage()


def run(gateway: Gateway, *, bind: str | None = None, announce=print) -> None:
    """Serve until SIGINT/SIGTERM. `announce` prints where to reach the gateway."""
    check_bind(bind or gateway.settings.listen)
    tls = tls_files(gateway)
    logging.getLogger("uvicorn.error").addFilter(_QuietUvicorn())

    def ready() -> None:
        if tls and tls.ca:
            announce(f"kubegate: serving a certificate from its own CA; clients must trust {tls.ca}")
        announce(f"kubegate: serving {len(gateway.connections)} connection(s) on {gateway.public_url}")
        for connection in gateway.connections:
            upstream = connection.upstream.base_url
            announce(f"  {connection.name}: {gateway.connection_url(connection.name)} -> {upstream}")

    asyncio_run(serve_until_signal(gateway, tls, bind, on_ready=ready))


def check_bind(bind: str) -> None:
    """Fail early, with the OS's reason, when the address cannot be served (e.g. already in use)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, int(port)))


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


async def serve_until_signal(
    gateway: Gateway,
    tls: TLSFiles | None,
    bind: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve with the configured server until SIGINT or SIGTERM, then stop the gateway cleanly."""
    started: list[Callable[[], bool]] = [lambda: True]
    ready = asyncio.ensure_future(
        _when_listening(bind or gateway.settings.listen, on_ready or (lambda: None), lambda: started[0]())
    )
    # Everything loaded so far (config, plugins, modules) lives as long as the process: keep it out of the
    # collector's way, and collect young objects less often (a few % of request time was GC).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    app = Reloadable(gateway)
    loop = asyncio.get_running_loop()
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, app.reload_soon)
    try:
        if gateway.settings.server == "hypercorn":
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            config = hypercorn_config(gateway, tls, bind)
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
            server = uvicorn.Server(uvicorn_config(gateway, tls, bind, app))
            started[0] = lambda: server.started
            try:
                await server.serve()
            except SystemExit:
                if not gateway.startup_error:
                    raise
            if not server.started:
                if gateway.startup_error:
                    raise StartupError(gateway.startup_error)
                raise OSError(f"cannot serve on {bind or gateway.settings.listen}")
    finally:
        ready.cancel()
        if hasattr(signal, "SIGHUP"):
            loop.remove_signal_handler(signal.SIGHUP)
        for running in {gateway, app.current, *app.retiring}:
            await running.stop()  # no-op when the lifespan already stopped it


class StartupError(Exception):
    """The gateway could not start (a plugin's or the database's reason)."""


class Reloadable:
    """The application the server runs: the current gateway, replaced by a freshly loaded one on SIGHUP.

    New requests go to the new configuration as soon as it has started; requests, watches and sessions
    already open stay with the old one, which stops once they are done (or after its
    `shutdown_grace_seconds`). A config that does not load or start is refused with a log line, and the
    running one stays. The listening address and TLS files belong to the server: changing them needs a
    restart (the log says so)."""

    def __init__(self, gateway: Gateway):
        self.current = gateway
        self.inflight: dict[int, int] = {}
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
        try:
            await gateway(scope, receive, send)
        finally:
            self.inflight[key] -= 1

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
            try:
                await new.start()
            except Exception as exc:
                log.error("reload refused, the running configuration stays: cannot start it: %s", exc)
                await new.stop()
                return False
            for key in ("listen", "tls"):
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


def asyncio_run(coro) -> None:
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
