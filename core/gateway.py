"""The gateway: config + plugins + connections, served as one ASGI application.

``/k8s/...`` goes to the raw-ASGI data path (:mod:`kubegate.core.proxy`); everything else (health, plugin
routes, the UI to come) is a Quart application.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from quart import Quart, jsonify

from .config import ConfigError, GatewaySettings, first_error, parse_settings
from .connections import ConnectionRegistry, build_registry
from .db import Database, DatabaseError, default_url
from .observe import Readiness, metrics_body
from .plugins import PluginHost
from .proxy import PREFIX, Proxy, Receive, Scope, Send

log = logging.getLogger("kubegate")


class Gateway:
    def __init__(self, settings: GatewaySettings, config_path: Path, plugins: PluginHost):
        self.settings = settings
        self.config_path = config_path
        self.plugins = plugins
        self.plugin_settings = _gateway_plugin_settings(settings, config_path, plugins)
        # Objects plugins keep for the gateway's lifetime, by plugin name (services, caches).
        self.extensions: dict[str, Any] = {}
        try:
            self.database = Database(settings.database.url or default_url(settings.state_dir))
        except DatabaseError as exc:
            raise ConfigError(config_path, "database.url", str(exc)) from None
        self.connections: ConnectionRegistry = build_registry(settings, config_path, plugins)
        self.proxy = Proxy(self.connections, plugins)
        self.public_url = settings.public_url or _default_url(settings)
        self.app = self._make_app()
        self.running = False
        self._app_started = False
        self.startup_error = ""  # why start() failed, for the CLI to print

    @classmethod
    def from_config(cls, path: Path, plugins: PluginHost | None = None) -> Gateway:
        """Load and validate a config file; raises ConfigError naming the file, key and reason."""
        settings = parse_settings(path)
        return cls(settings, path, plugins or PluginHost())

    def settings_for(self, plugin: str) -> Any:
        """The validated gateway-wide settings of `plugin` (None when it is not listed under `plugins`)."""
        return self.plugin_settings.get(plugin)

    def connection_url(self, name: str) -> str:
        return f"{self.public_url.rstrip('/')}/k8s/{name}"

    def _make_app(self) -> Quart:
        app = Quart(__name__)
        app.config["RESPONSE_TIMEOUT"] = None  # plugin routes may stream too
        app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # forms and JSON of plugin routes; not the API path

        @app.get("/healthz")
        async def healthz() -> tuple[str, int]:
            return "ok", 200  # liveness: the process serves requests

        readiness = Readiness(self)

        @app.get("/readyz")
        async def readyz() -> Any:
            ready, report = await readiness.check()
            response = jsonify({"ready": ready, **report})
            response.status_code = 200 if ready else 503
            response.headers["Cache-Control"] = "no-store"
            return response

        @app.get("/metrics")
        async def metrics() -> Any:
            body, content_type = await metrics_body(self)
            return body, 200, {"Content-Type": content_type, "Cache-Control": "no-store"}

        @app.get("/")
        async def index() -> Any:
            return jsonify(
                {
                    "name": "kubegate",
                    "connections": [
                        {"name": c.name, "url": f"/k8s/{c.name}", "plugins": c.enabled_plugins}
                        for c in self.connections
                    ],
                }
            )

        for blueprint in self.plugins.http_routes(self):
            app.register_blueprint(blueprint)
        return app

    async def start(self) -> None:
        self.running = True
        try:
            await asyncio.to_thread(self.database.create_tables)
            await self.connections.start()
            await self.plugins.startup(self)
            await self.app.startup()
            self._app_started = True
        except Exception as exc:
            self.startup_error = str(exc)
            await self.stop()
            raise

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        await self.plugins.shutdown(self)
        if self._app_started:
            self._app_started = False
            await self.app.shutdown()
        await self.connections.close()
        self.database.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope.get("path", "").encode()
        if raw_path.startswith(PREFIX):
            await self.proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)  # type: ignore[arg-type]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except (ConfigError, DatabaseError) as exc:
                    log.error("startup failed: %s", exc)  # the user's to fix: no traceback
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def _gateway_plugin_settings(
    settings: GatewaySettings, config_path: Path, host: PluginHost
) -> dict[str, Any]:
    models = host.gateway_settings_models()
    result: dict[str, Any] = {}
    for name, raw in settings.plugins.items():
        model = models.get(name)
        if model is None:
            known = ", ".join(sorted(models)) or "none"
            raise ConfigError(
                config_path, f"plugins.{name}", f"not a gateway-wide plugin (gateway-wide plugins: {known})"
            )
        try:
            result[name] = model.model_validate(raw or {}, context={"base_dir": config_path.parent})
        except ValidationError as exc:
            key, reason = first_error(exc, f"plugins.{name}")
            raise ConfigError(config_path, key, reason) from None
    return result


def _default_url(settings: GatewaySettings) -> str:
    return url_for_address(settings, settings.host, settings.port)


def url_for_address(settings: GatewaySettings, host: str, port: int) -> str:
    """The URL clients use when `public_url` is not set: the listening address (localhost for a wildcard)."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls.enabled else "http"
    return f"{scheme}://{host}:{port}"
