"""Serving the gateway: Hypercorn on uvloop, TLS on by default."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from hypercorn.asyncio import serve
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
    config.graceful_timeout = 5
    return config


def run(gateway: Gateway, *, bind: str | None = None, announce=print) -> None:
    """Serve until SIGINT/SIGTERM. `announce` prints where to reach the gateway."""
    check_bind(bind or gateway.settings.listen)
    tls = tls_files(gateway)
    config = hypercorn_config(gateway, tls, bind)
    if tls and tls.ca:
        announce(f"kubegate: serving a certificate from its own CA; clients must trust {tls.ca}")
    announce(f"kubegate: serving {len(gateway.connections)} connection(s) on {gateway.public_url}")
    for connection in gateway.connections:
        announce(
            f"  {connection.name}: {gateway.connection_url(connection.name)} -> {connection.upstream.base_url}"
        )
    asyncio_run(serve_until_signal(gateway, config))


def check_bind(bind: str) -> None:
    """Fail early, with the OS's reason, when the address cannot be served (e.g. already in use)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, int(port)))


async def serve_until_signal(gateway: Gateway, config: HypercornConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(gateway, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        await gateway.stop()  # no-op when the lifespan already stopped it


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
