"""Test helpers for plugin authors (importable as ``kubegate.testing``; also a pytest plugin).

Unit-test a hook without a network::

    from kubegate.testing import make_flow
    import my_plugin

    async def test_namespace_deletes_are_denied():
        flow = make_flow("DELETE", "/api/v1/namespaces/prod", plugins=[my_plugin])
        decision = await my_plugin.kubegate_decide(flow)   # or a plain call for a `def` hook
        assert decision.verdict == "deny"

Test it end to end, with real kubectl through a real gateway in front of the sandbox cluster (fixtures
``sandbox`` and ``make_gateway``; with ``-p kubegate.testing`` or ``pytest_plugins = ["kubegate.testing"]``
in a conftest.py when the pytest11 entry point is not installed)::

    def test_kubectl_is_refused(sandbox, make_gateway):
        users = {"alice": ("alice-token-0123456789", ["developers"])}
        config = {"connections": {"prod": {"upstream": sandbox_upstream(sandbox),
                                           "plugins": {"static-tokens": static_tokens(users), "my-plugin": {}}}}}
        gateway = make_gateway(config, plugins=[my_plugin])
        kubeconfig = gateway.kubeconfig("prod", "alice", "alice-token-0123456789")
        ...  # run kubectl with KUBECONFIG=kubeconfig
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest
import yaml

from kubegate.core.attributes import parse_request, path_unescape
from kubegate.core.flow import Flow, Identity, Request
from kubegate.core.plugins import PluginHost

if TYPE_CHECKING:
    import aiohttp
    import uvicorn

    from kubegate.core.connections import Connection
    from kubegate.core.gateway import Gateway

__all__ = [
    "GatewayProcess",
    "RunningGateway",
    "Sandbox",
    "free_port",
    "make_connection",
    "make_flow",
    "make_gateway",
    "sandbox",
    "sandbox_upstream",
    "start_gateway",
    "start_gateway_process",
    "start_sandbox",
    "static_tokens",
    "wait_for",
    "wait_for_async",
    "write_kubeconfig",
]

Plugin = ModuleType | object


# ---------------------------------------------------------------------------------------------------------
# Flows for unit tests: no network, no config file
# ---------------------------------------------------------------------------------------------------------


class _NoUpstream:
    """The upstream of a connection built for unit tests: nothing is ever sent."""

    base_url = "https://upstream.invalid"
    request_options: dict[str, Any] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        raise RuntimeError("a connection made by kubegate.testing has no upstream session")

    def credential_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", "Bearer gateway-credential")]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return "no upstream (kubegate.testing)"


def make_connection(
    name: str = "test",
    *,
    plugins: Iterable[Plugin] = (),
    settings: Mapping[str, Mapping[str, Any] | None] | None = None,
    host: PluginHost | None = None,
) -> Connection:
    """A connection with the given plugins enabled, their settings validated like the gateway does.

    :param plugins: plugin modules or objects to register besides the built-ins (each with ``PLUGIN_NAME``).
    :param settings: ``{plugin name: settings}`` — the connection's ``plugins`` block. Every plugin of
        ``plugins`` is enabled, with ``{}`` when not given here; built-ins are enabled by listing them.
    :param host: a plugin host to reuse (``plugins`` is then ignored).
    """
    from kubegate.core.connections import Connection

    plugins = list(plugins)
    host = host or PluginHost(load_entry_points=False, extra=plugins)
    wanted: dict[str, Mapping[str, Any] | None] = {_plugin_name(p): {} for p in plugins}
    wanted.update(settings or {})
    models = host.plugin_settings_models()
    validated: dict[str, Any] = {}
    for plugin_name, raw in wanted.items():
        if plugin_name not in host.names:
            raise ValueError(f"no plugin {plugin_name!r} (installed: {', '.join(host.names)})")
        model = models.get(plugin_name)
        validated[plugin_name] = (
            model.model_validate(dict(raw or {}), context={"base_dir": Path.cwd()}) if model else None
        )
    return Connection(
        name=name,
        type="kubernetes",
        description="made by kubegate.testing",
        upstream=_NoUpstream(),
        hooks=host.for_connection(validated),
        plugin_settings=validated,
    )


def make_flow(
    method: str = "GET",
    path: str = "/api/v1/namespaces/default/pods",
    *,
    query: str = "",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: bytes | str | None = None,
    identity: Identity | str | None = "alice",
    connection: Connection | str | None = None,
    plugins: Iterable[Plugin] = (),
    settings: Mapping[str, Mapping[str, Any] | None] | None = None,
    websocket: bool = False,
) -> Flow:
    """A :class:`~kubegate.core.flow.Flow` as the gateway builds it for a request, to call hooks directly.

    :param method: the HTTP method (``GET`` for a WebSocket upgrade).
    :param path: the connection-relative path, e.g. ``/api/v1/namespaces/prod/pods/web``; the attributes
        (verb, resource, namespace, name…) are parsed from it and ``query`` exactly as the gateway does.
    :param identity: who is calling (a user name, or an ``Identity``); None for a flow before
        authentication.
    :param connection: a connection from :func:`make_connection`, or a name for a new one with
        ``plugins`` and ``settings`` (see there).
    :param body: the request body, readable with ``await flow.request.read_body()``.
    """
    if not isinstance(connection, str) and connection is not None:
        conn = connection
    else:
        conn = make_connection(connection or "test", plugins=plugins, settings=settings)
    header_list = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    data = body.encode() if isinstance(body, str) else body
    # Read as the proxy reads a live request: plugins see the canonical query that goes upstream.
    attributes = parse_request(method.upper(), path_unescape(path), query)
    request = Request(
        method=method.upper(),
        path=path,
        query=attributes.canonical_query,
        raw_query=query,
        headers=header_list,
        client_addr="127.0.0.1",
        websocket=websocket,
        body=data,
        body_size=len(data or b""),
        body_sha256=hashlib.sha256(data).hexdigest() if data else "",
    )
    flow = Flow(connection=conn, request=request, attributes=attributes)
    if isinstance(identity, str):
        identity = Identity(user=identity, method="kubegate.testing")
    flow.identity = identity
    return flow


def _plugin_name(plugin: Plugin) -> str:
    name = getattr(plugin, "PLUGIN_NAME", None) or getattr(plugin, "__name__", None)
    if not name:
        raise ValueError(f"plugin {plugin!r} has no PLUGIN_NAME")
    return str(name)


# ---------------------------------------------------------------------------------------------------------
# Waiting for something to happen (an audit line written after the response, a gateway noticing a change)
# ---------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = 10,
    interval: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call `condition` until it returns something truthy, and return that; instead of a fixed sleep.

    :param what: what is waited for, e.g. ``"the audit line of the delete"``: a timeout fails the test
        with ``AssertionError: timed out after 10 s waiting for <what> (last: <last value>)``.
    :param ignore: exceptions that mean "not yet" (e.g. ``OSError`` while a server restarts); the last one
        is named in the failure. Any other exception fails at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            value = condition()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, last))
        time.sleep(interval)


async def wait_for_async(
    condition: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    timeout: float = 10,  # noqa: ASYNC109 - the same arguments as wait_for
    interval: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """:func:`wait_for` in an event loop: `condition` may be a plain or an ``async`` function, and the
    loop keeps running between calls."""
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            answer = condition()
            value: T = await answer if inspect.isawaitable(answer) else answer
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, last))
        await asyncio.sleep(interval)


def _timed_out(what: str, timeout: float, last: object) -> str:
    shown = repr(last)
    return f"timed out after {timeout:g} s waiting for {what} (last: {shown[:500]})"


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that nothing binding port 0 (a
    sandbox, an outgoing connection) takes it between this call and the server that binds it."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


# ---------------------------------------------------------------------------------------------------------
# The sandbox cluster
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A running sandbox cluster process (``python -m kubegate.sandbox serve``)."""

    dir: Path
    url: str
    port: int
    kubeconfig: Path  # straight to the sandbox, as its admin
    token: str  # the credential a gateway uses; also in ``dir / "token"``
    ca_file: Path
    process: subprocess.Popen[str]

    def stop(self) -> None:
        _stop(self.process)

    def requests_log(self, since: int = 0) -> list[dict[str, Any]]:
        """What the cluster received after the entry with id `since` (method, path, impersonation
        headers, token hashes…), oldest first, read over its admin API: to check what your plugin let
        through, and as whom."""
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(
            f"{self.url}/sandbox/requests?since={since}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            items: list[dict[str, Any]] = json.loads(response.read())["items"]
        # The log's own reads are recorded too; leave them out.
        return [item for item in items if not item["path"].startswith("/sandbox/")]


def start_sandbox(directory: Path, timeout: float = 30) -> Sandbox:
    """Start a sandbox cluster in a subprocess; returns once it accepts connections."""
    directory.mkdir(parents=True, exist_ok=True)
    log = open(directory / "sandbox.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubegate.sandbox", "serve", "--dir", str(directory), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            info = json.loads(line)
            return Sandbox(
                dir=directory,
                url=info["url"],
                port=info["port"],
                kubeconfig=Path(info["kubeconfig"]),
                token=info["token"],
                ca_file=Path(info["ca_file"]),
                process=proc,
            )
        if proc.poll() is not None:
            break
    _stop(proc)
    raise RuntimeError(f"the sandbox did not start: {(directory / 'sandbox.log').read_text()}")


def sandbox_upstream(sandbox: Sandbox) -> dict[str, Any]:
    """The ``upstream`` block of a connection to `sandbox`, with the gateway's token credential."""
    return {
        "server": sandbox.url,
        "certificate_authority": str(sandbox.ca_file),
        "token_file": str(sandbox.dir / "token"),
    }


def static_tokens(users: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, Any]:
    """``static-tokens`` settings for ``{user: (token, groups)}`` (the tokens are stored as SHA-256)."""
    return {
        "tokens": [
            {"user": user, "groups": list(groups), "sha256": hashlib.sha256(token.encode()).hexdigest()}
            for user, (token, groups) in users.items()
        ]
    }


# ---------------------------------------------------------------------------------------------------------
# Gateways: in this process (any plugin object) or as a `kubegate serve` process (entry-point plugins)
# ---------------------------------------------------------------------------------------------------------


class _Served(Protocol):
    url: str
    ca_file: Path
    dir: Path


def write_kubeconfig(
    gateway: _Served, connection: str, user: str, token: str, path: Path | None = None
) -> Path:
    """Write a kubeconfig for `user` (bearer `token`) reaching `connection` through `gateway`."""
    from kubegate.core.kubeconfig import dump, gateway_kubeconfig, write_private

    digest = hashlib.sha256(token.encode()).hexdigest()[:8]
    path = path or gateway.dir / f"kubeconfig-{connection}-{user}-{digest}"
    config = gateway_kubeconfig(
        cluster=connection,
        server=f"{gateway.url}/k8s/{connection}",
        ca_pem=gateway.ca_file.read_bytes(),
        users=[(user, token)],
    )
    write_private(path, dump(config))
    return path


def _prepare(config: Mapping[str, Any], directory: Path, listen: str | None = None) -> Path:
    """Write the config file, with `state_dir` and `listen` filled in when missing."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = dict(config)
    doc.setdefault("state_dir", str(directory / "state"))
    if listen:
        doc["listen"] = listen
    path = directory / "kubegate.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class RunningGateway:
    """A gateway served by uvicorn in a thread of this process (see :func:`start_gateway`)."""

    dir: Path
    url: str
    config: Path
    ca_file: Path
    gateway: Gateway
    _server: uvicorn.Server
    _thread: threading.Thread
    _errors: list[BaseException] = field(default_factory=list)

    def connection_url(self, name: str) -> str:
        return f"{self.url}/k8s/{name}"

    def kubeconfig(self, connection: str, user: str, token: str) -> Path:
        return write_kubeconfig(self, connection, user, token)

    def stop(self, timeout: float = 15) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)


def start_gateway(
    config: Mapping[str, Any],
    directory: Path,
    *,
    plugins: Iterable[Plugin] = (),
    load_entry_points: bool = True,
    timeout: float = 30,
) -> RunningGateway:
    """Serve a gateway with extra `plugins` registered, in a thread of this process, over TLS on a free
    loopback port (``listen`` is overridden); returns once it accepts connections. Call ``stop()``.

    :param config: the config file's content (``connections`` at least); ``state_dir`` defaults to a
        folder of `directory`.
    :param plugins: plugin modules or objects registered besides the built-ins and installed entry
        points; enable them per connection in ``config`` as usual.
    """
    from kubegate.core.gateway import Gateway
    from kubegate.core.server import tls_files, uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    path = _prepare(config, directory, listen=f"127.0.0.1:{port}")
    host = PluginHost(load_entry_points=load_entry_points, extra=plugins)
    gateway = Gateway.from_config(path, plugins=host)
    tls = tls_files(gateway)
    server = _uvicorn_server(uvicorn_config(gateway, tls))
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=serve, name=f"kubegate-gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            why = gateway.startup_error or (repr(errors[0]) if errors else "timed out")
            raise RuntimeError(f"the gateway did not start: {why}")
        time.sleep(0.02)
    ca_file = tls.ca if tls and tls.ca else Path(gateway.settings.state_dir) / "tls" / "ca.crt"
    return RunningGateway(
        dir=directory,
        url=f"https://127.0.0.1:{port}",
        config=path,
        ca_file=ca_file,
        gateway=gateway,
        _server=server,
        _thread=thread,
        _errors=errors,
    )


def _uvicorn_server(config: uvicorn.Config) -> uvicorn.Server:
    import uvicorn

    return uvicorn.Server(config)


@dataclass
class GatewayProcess:
    """A ``kubegate serve`` process (see :func:`start_gateway_process`)."""

    dir: Path
    url: str
    config: Path
    ca_file: Path
    log: Path
    process: subprocess.Popen[bytes]

    def connection_url(self, name: str) -> str:
        return f"{self.url}/k8s/{name}"

    def kubeconfig(self, connection: str, user: str, token: str) -> Path:
        return write_kubeconfig(self, connection, user, token)

    def stop(self) -> None:
        _stop(self.process)


def start_gateway_process(
    config: Mapping[str, Any],
    directory: Path,
    *,
    pythonpath: Sequence[Path | str] = (),
    timeout: float = 30,
    listen: str | None = None,
) -> GatewayProcess:
    """Run ``kubegate serve`` as a subprocess, the way it runs in production: plugins come from installed
    entry points — put a folder your plugin package was installed into (``pip install --target``) on
    `pythonpath`. Returns once ``/healthz`` answers. Call ``stop()``.

    :param listen: ``HOST:PORT`` to serve on (e.g. to restart on the same address); a free loopback port
        by default.
    """
    import ssl
    import urllib.request

    listen = listen or f"127.0.0.1:{free_port()}"
    path = _prepare(config, directory, listen=listen)
    state_dir = Path(yaml.safe_load(path.read_text())["state_dir"])
    log = directory / "gateway.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    kubegate = Path(sys.executable).parent / "kubegate"
    command = [str(kubegate)] if kubegate.exists() else [sys.executable, "-m", "kubegate.core.cli"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*command, "serve", "--config", str(path)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"https://{listen}"
    ca_file = state_dir / "tls" / "ca.crt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kubegate serve exited ({proc.returncode}): {log.read_text()}")
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            with urllib.request.urlopen(f"{url}/healthz", context=ctx, timeout=2) as resp:
                # The whole answer, not only its status line: the request is over, for the gateway too.
                if resp.status == 200 and resp.read() == b"ok":
                    return GatewayProcess(directory, url, path, ca_file, log, proc)
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(f"kubegate serve did not start: {log.read_text()}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------------------------------------
# pytest fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox cluster for the test session (real kubectl accepts it; see docs/sandbox.md)."""
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield running
    running.stop()


@pytest.fixture(name="make_gateway")
def make_gateway_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A factory: ``make_gateway(config, plugins=[...])`` serves a gateway in this process (see
    :func:`start_gateway`) and stops it after the test."""
    started: list[RunningGateway] = []

    def make_gateway(
        config: Mapping[str, Any], plugins: Iterable[Plugin] = (), **kwargs: Any
    ) -> RunningGateway:
        running = start_gateway(config, tmp_path_factory.mktemp("gateway"), plugins=plugins, **kwargs)
        started.append(running)
        return running

    yield make_gateway
    for running in started:
        running.stop()


@pytest.fixture(name="make_flow")
def make_flow_fixture() -> Any:
    """:func:`make_flow`, as a fixture."""
    return make_flow


def make_gateway(
    config: Mapping[str, Any], plugins: Iterable[Plugin] = (), directory: Path | None = None, **kwargs: Any
) -> RunningGateway:
    """:func:`start_gateway` in `directory` (a new temporary folder by default); stop it with ``stop()``.
    In tests, prefer the ``make_gateway`` fixture, which stops it for you."""
    import tempfile

    directory = directory or Path(tempfile.mkdtemp(prefix="kubegate-gateway-"))
    return start_gateway(config, directory, plugins=plugins, **kwargs)
