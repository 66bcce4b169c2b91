"""The built-in ``kubernetes`` connection type: an API server reached with the gateway's own credential.

Credential sources (exactly one): a token file (re-read when it changes, so a projected service-account
token that the kubelet rotates keeps working), a client certificate and key, a kubeconfig file + context,
or ``in_cluster: true`` (the pod's service-account token and CA).
"""

from __future__ import annotations

import base64
import contextlib
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml
from pydantic import BaseModel, ConfigDict, Field

from kubegate.core.config import LimitSettings, resolve
from kubegate.core.plugins import hookimpl

from .registry import ConnectionType, PooledUpstream, SettingError, upstream_session

PLUGIN_NAME = "kubernetes"

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_RECHECK_SECONDS = 1.0


class KubernetesUpstreamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: str | None = Field(None, description="API server URL, e.g. https://10.0.0.1:6443")
    certificate_authority: Path | None = Field(None, description="CA bundle (PEM) for the API server.")
    certificate_authority_data: str | None = Field(None, description="Base64 PEM CA, as in kubeconfigs.")
    insecure_skip_tls_verify: bool = Field(False, description="Never in production.")
    tls_server_name: str | None = None
    token_file: Path | None = Field(None, description="Bearer token file; re-read when it changes.")
    client_certificate: Path | None = None
    client_key: Path | None = None
    kubeconfig: Path | None = Field(None, description="A kubeconfig with the gateway's credential.")
    context: str | None = Field(None, description="Context in `kubeconfig`; its current-context if unset.")
    in_cluster: bool = Field(False, description="Use the pod's service account.")


class TokenSource:
    """A bearer token read from a file and re-read when the file changes (checked at most once a second)."""

    def __init__(self, path: Path | None = None, token: str | None = None):
        self.path, self._token = path, token or ""
        self._checked = 0.0
        self._mtime = 0.0
        if path is not None:
            self._reload()

    def _reload(self) -> None:
        assert self.path is not None
        stat = self.path.stat()
        if stat.st_mtime != self._mtime or not self._token:
            self._token = self.path.read_text().strip()
            self._mtime = stat.st_mtime

    def token(self) -> str:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= TOKEN_RECHECK_SECONDS:
                self._checked = now
                # On a read error keep the last good token; the API server will say if it has expired.
                with contextlib.suppress(OSError):
                    self._reload()
        return self._token


class KubernetesUpstream(PooledUpstream):
    def __init__(
        self,
        name: str,
        base_url: str,
        ssl_context: ssl.SSLContext,
        token: TokenSource | None,
        limits: LimitSettings,
        describe: str,
        server_hostname: str | None = None,
    ):
        self.name = name
        # Sent as SNI and checked against the certificate instead of the URL's host (kubeconfig
        # `tls-server-name`), e.g. when the API server is reached by IP.
        self.request_options: dict[str, Any] = {"server_hostname": server_hostname} if server_hostname else {}
        self.base_url = base_url.rstrip("/")
        self.ssl_context = ssl_context
        self.token = token
        self.limits = limits
        self._description = describe

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            ssl=self.ssl_context if self.base_url.startswith("https") else False,
            limit=self.limits.upstream_pool_size,
            ttl_dns_cache=300,
        )
        self._session = upstream_session(connector, self.limits)

    def credential_headers(self) -> list[tuple[str, str]]:
        if self.token is None:
            return []
        return [("Authorization", f"Bearer {self.token.token()}")]

    def describe(self) -> str:
        return self._description


class KubernetesConnectionType:
    settings_model = KubernetesUpstreamSettings

    def create_upstream(
        self, name: str, settings: KubernetesUpstreamSettings, base_dir: Path, limits: LimitSettings
    ) -> KubernetesUpstream:
        sources = [
            key
            for key, present in (
                ("token_file", settings.token_file),
                ("client_certificate", settings.client_certificate or settings.client_key),
                ("kubeconfig", settings.kubeconfig),
                ("in_cluster", settings.in_cluster),
            )
            if present
        ]
        if len(sources) != 1:
            raise SettingError(
                sources[1] if len(sources) > 1 else "token_file",
                "give exactly one credential: token_file, client_certificate + client_key, kubeconfig "
                "(+ context) or in_cluster" + (f" (found: {', '.join(sources)})" if sources else ""),
            )
        if settings.kubeconfig:
            return self._from_kubeconfig(name, settings, resolve(base_dir, settings.kubeconfig), limits)
        if settings.in_cluster:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host or not port:
                raise SettingError(
                    "in_cluster", "KUBERNETES_SERVICE_HOST/PORT are not set: not running in a pod"
                )
            server = settings.server or f"https://{_bracket(host)}:{port}"
            cluster_ca = settings.certificate_authority or IN_CLUSTER_DIR / "ca.crt"
            token_path = IN_CLUSTER_DIR / "token"
            ctx = _ssl_context(ca_file=cluster_ca, key="certificate_authority")
            return KubernetesUpstream(
                name,
                _check_server(server),
                ctx,
                _token_source(token_path, "in_cluster"),
                limits,
                "in-cluster",
            )
        if not settings.server:
            raise SettingError("server", "required (the API server URL)")
        ca_file = (
            resolve(base_dir, settings.certificate_authority) if settings.certificate_authority else None
        )
        ctx = _ssl_context(
            ca_file=ca_file,
            ca_data=_b64(settings.certificate_authority_data, "certificate_authority_data"),
            insecure=settings.insecure_skip_tls_verify,
            key="certificate_authority",
        )
        token = None
        if settings.token_file:
            token = _token_source(resolve(base_dir, settings.token_file), "token_file")
            what = f"token file {settings.token_file}"
        else:
            if not (settings.client_certificate and settings.client_key):
                raise SettingError("client_key", "client_certificate and client_key go together")
            _load_client_cert(
                ctx, resolve(base_dir, settings.client_certificate), resolve(base_dir, settings.client_key)
            )
            what = f"client certificate {settings.client_certificate}"
        return KubernetesUpstream(
            name, _check_server(settings.server), ctx, token, limits, what, settings.tls_server_name
        )

    def _from_kubeconfig(
        self, name: str, settings: KubernetesUpstreamSettings, path: Path, limits: LimitSettings
    ) -> KubernetesUpstream:
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SettingError("kubeconfig", f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingError("kubeconfig", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise SettingError("kubeconfig", f"{path} is not a kubeconfig")
        context_name = settings.context or doc.get("current-context")
        if not context_name:
            raise SettingError("context", f"{path} has no current-context; name one")
        context = _named(doc, "contexts", context_name, "context")
        if context is None:
            raise SettingError("context", f"no context {context_name!r} in {path}")
        cluster = _named(doc, "clusters", context.get("cluster"), "cluster")
        user = _named(doc, "users", context.get("user"), "user")
        if cluster is None or user is None:
            raise SettingError(
                "context", f"context {context_name!r} in {path} names a missing cluster or user"
            )
        server = settings.server or cluster.get("server")
        if not server:
            raise SettingError("kubeconfig", f"cluster of context {context_name!r} has no server")
        kdir = path.parent
        ca_path = cluster.get("certificate-authority")
        ctx = _ssl_context(
            ca_file=resolve(kdir, Path(ca_path)) if ca_path else None,
            ca_data=_b64(cluster.get("certificate-authority-data"), "kubeconfig"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")) or settings.insecure_skip_tls_verify,
            key="kubeconfig",
        )
        for unsupported in ("exec", "auth-provider", "username", "password"):
            if user.get(unsupported):
                raise SettingError(
                    "kubeconfig",
                    f"user of context {context_name!r} uses {unsupported!r}, which the gateway cannot use for "
                    "its own credential; use a token, tokenFile or client certificate",
                )
        token: TokenSource | None = None
        if user.get("tokenFile"):
            token = _token_source(resolve(kdir, Path(user["tokenFile"])), "kubeconfig")
        elif user.get("token"):
            token = TokenSource(token=str(user["token"]))
        if user.get("client-certificate") or user.get("client-certificate-data"):
            with tempfile.TemporaryDirectory() as tmp:
                cert = _file_or_data(user, "client-certificate", kdir, Path(tmp) / "c.pem")
                key = _file_or_data(user, "client-key", kdir, Path(tmp) / "k.pem")
                _load_client_cert(ctx, cert, key)
        elif token is None:
            raise SettingError(
                "kubeconfig", f"user of context {context_name!r} has no token or client certificate"
            )
        return KubernetesUpstream(
            name,
            _check_server(server),
            ctx,
            token,
            limits,
            f"kubeconfig {path} context {context_name}",
            cluster.get("tls-server-name") or settings.tls_server_name,
        )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_server(server: str) -> str:
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SettingError("server", f"{server!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise SettingError("server", "must not have a query or fragment")
    return server.rstrip("/")


def _b64(value: str | None, key: str) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise SettingError(key, "certificate data is not valid base64") from None


def _token_source(path: Path, key: str) -> TokenSource:
    try:
        source = TokenSource(path)
    except OSError as exc:
        raise SettingError(key, f"cannot read token file {path}: {exc.strerror}") from None
    if not source.token():
        raise SettingError(key, f"token file {path} is empty")
    return source


def _ssl_context(
    *,
    ca_file: Path | None = None,
    ca_data: bytes | None = None,
    insecure: bool = False,
    key: str,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=str(ca_file))
        if ca_data:
            ctx.load_verify_locations(cadata=ca_data.decode())
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise SettingError(key, f"cannot load CA certificate: {exc}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # HTTP/1.1 upstream: WebSocket upgrades need it, and aiohttp speaks nothing else.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SettingError("client_certificate", f"cannot load client certificate/key: {exc}") from None


def _file_or_data(user: dict[str, Any], field: str, base: Path, tmp: Path) -> Path:
    if user.get(field):
        return resolve(base, Path(user[field]))
    data = _b64(user.get(f"{field}-data"), "kubeconfig")
    if data is None:
        raise SettingError("kubeconfig", f"user has no {field}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def _named(doc: dict[str, Any], section: str, name: Any, inner: str) -> dict[str, Any] | None:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner)
            return value if isinstance(value, dict) else {}
    return None


@hookimpl
def kubegate_connection_types() -> dict[str, ConnectionType]:
    return {"kubernetes": KubernetesConnectionType()}
