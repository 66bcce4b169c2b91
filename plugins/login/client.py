"""The client side of `kubegate login`: talk to the gateway, cache the token, write the kubeconfig, and
answer kubectl as an exec credential plugin (`kubegate credential`).

Standard library only (urllib), so the exec plugin starts fast and needs nothing of the gateway's server
stack; what only `kubegate login` needs (yaml for the kubeconfig, webbrowser) is imported when it runs.
Every message for the person goes to stderr: kubectl reads the credential from stdout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXEC_API_VERSION = "client.authentication.k8s.io/v1"
RENEW_BEFORE_SECONDS = 60  # a token this close to expiry is not handed to kubectl


class ClientError(Exception):
    """Shown to the person as one line."""


@dataclass
class Target:
    gateway: str
    connection: str
    ca_file: str | None = None
    insecure: bool = False

    @property
    def server(self) -> str:
        return f"{self.gateway.rstrip('/')}/k8s/{self.connection}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.gateway.startswith("https:"):
            return None
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ClientError(f"cannot use the CA file {self.ca_file}: {exc}") from None


def cache_dir() -> Path:
    configured = os.environ.get("KUBEGATE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".kube" / "cache" / "kubegate"


def cache_path(target: Target) -> Path:
    key = hashlib.sha256(f"{target.gateway.rstrip('/')}|{target.connection}".encode()).hexdigest()[:24]
    return cache_dir() / f"{key}.json"


def read_cached(target: Target) -> dict[str, Any] | None:
    try:
        cached = json.loads(cache_path(target).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or not isinstance(cached.get("token"), str):
        return None
    if float(cached.get("expires_at", 0)) - RENEW_BEFORE_SECONDS <= time.time():
        return None
    return cached


def write_cached(target: Target, answer: dict[str, Any]) -> None:
    path = cache_path(target)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept = {k: answer[k] for k in ("token", "expires_at", "user", "groups", "id") if k in answer}
    _write_private(path, json.dumps(kept))


def remembered_path() -> Path:
    return cache_dir() / "last-login.json"


def remember_target(target: Target) -> None:
    """What `kubegate login` logged in to, so that `kubegate approvals` needs no flags afterwards. Not
    `--insecure-skip-tls-verify`: a later command skips verification only when it is asked to again."""
    path = remembered_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_file = str(Path(target.ca_file).resolve()) if target.ca_file else None
    _write_private(
        path, json.dumps({"gateway": target.gateway, "connection": target.connection, "ca_file": ca_file})
    )


def remembered_target() -> Target | None:
    """The gateway, connection and CA of the last `kubegate login`; None when there was none (or the file
    is not what `remember_target` writes)."""
    try:
        saved = json.loads(remembered_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    gateway, connection, ca_file = saved.get("gateway"), saved.get("connection"), saved.get("ca_file")
    if not (isinstance(gateway, str) and gateway and isinstance(connection, str) and connection):
        return None
    return Target(gateway, connection, ca_file if isinstance(ca_file, str) and ca_file else None)


def _write_private(path: Path, text: str) -> None:
    """Credentials: readable by the owner only, also when the file existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def forget_cached(target: Target) -> dict[str, Any] | None:
    path = cache_path(target)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = None
    path.unlink(missing_ok=True)
    return cached if isinstance(cached, dict) else None


def call(
    target: Target, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """One JSON request to the gateway; (status, decoded body). Network failures raise ClientError."""
    url = f"{target.gateway.rstrip('/')}{path}"
    headers = {"User-Agent": f"kubegate-cli ({platform.node()})"}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=target.ssl_context()) as response:
            return response.status, _decode(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _decode(exc.read())
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach the gateway at {target.gateway}: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise ClientError(f"cannot reach the gateway at {target.gateway}: {exc}") from None


def _post(
    target: Target, path: str, body: dict[str, Any], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    return call(target, "POST", path, body, token)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"error": raw[:200].decode(errors="replace") or "no answer"}
    return body if isinstance(body, dict) else {"error": "unexpected answer"}


def login(
    target: Target,
    *,
    open_browser: bool = True,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run the whole login: start it, show the URL and code, wait for the browser half, return the token."""
    verifier = secrets.token_urlsafe(48)
    challenge = hashlib.sha256(verifier.encode()).hexdigest()
    status, started = _post(
        target,
        "/login/cli",
        {
            "code_challenge": challenge,
            "connection": target.connection,
            "description": f"kubegate login on {platform.node()}",
        },
    )
    if status != 200:
        raise ClientError(
            f"the gateway refused the login ({status}): {started.get('error', 'no reason given')}"
        )
    url, code = started["login_url"], started["user_code"]
    say(
        f"To log in to {target.gateway} ({target.connection}), open:\n\n    {url}\n\nand check that it shows the code {code}."
    )
    if open_browser and _has_graphical_browser():
        import webbrowser

        with _quiet_stdout():
            opened = webbrowser.open(url)
        if opened:
            say("(a browser window was opened)")
    deadline = float(started.get("expires_at", time.time() + 600))
    interval = max(float(started.get("interval", 1)), 0.2)
    while time.time() < deadline:
        sleep(interval)
        status, answer = _post(
            target, "/login/cli/token", {"login_id": started["login_id"], "code_verifier": verifier}
        )
        if status == 202:
            continue
        if status == 200 and isinstance(answer.get("token"), str):
            write_cached(target, answer)
            return answer
        raise ClientError(f"login failed: {answer.get('error', f'status {status}')}")
    raise ClientError("login timed out: nobody completed it in the browser")


def _has_graphical_browser() -> bool:
    """Without a desktop, webbrowser would start a console browser (lynx, w3m) in the foreground: a hang,
    since kubectl gives an exec plugin no terminal. Then the printed URL is the way."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class _quiet_stdout:
    """webbrowser may let a browser print to stdout, which kubectl would read as the credential."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 1)
        os.close(self._saved)


def exec_credential(token: str, expires_at: float) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": EXEC_API_VERSION,
        "kind": "ExecCredential",
        "status": {"token": token, "expirationTimestamp": stamp},
    }


def credential(target: Target, *, open_browser: bool = True) -> dict[str, Any]:
    """What kubectl's exec plugin call prints: the cached token, or a fresh login's."""
    info = os.environ.get("KUBERNETES_EXEC_INFO")
    if info:
        try:
            api_version = json.loads(info).get("apiVersion")
        except (ValueError, AttributeError):
            api_version = None
        if api_version and api_version != EXEC_API_VERSION:
            raise ClientError(f"kubectl asked for {api_version}; kubegate speaks {EXEC_API_VERSION}")
    cached = read_cached(target)
    if cached is None:
        cached = login(target, open_browser=open_browser)
    return exec_credential(cached["token"], float(cached["expires_at"]))


def default_kubeconfig() -> Path:
    configured = os.environ.get("KUBECONFIG", "")
    first = next((p for p in configured.split(os.pathsep) if p), "")
    return Path(first) if first else Path.home() / ".kube" / "config"


def update_kubeconfig(path: Path, target: Target, command: str, *, set_current: bool = True) -> str:
    """Add or replace the cluster, user and context `kubegate-CONNECTION`; returns the context name."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError) as exc:
        raise ClientError(f"cannot read the kubeconfig {path}: {exc}") from None
    if config is None:
        config = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    if not isinstance(config, dict):
        raise ClientError(f"{path} is not a kubeconfig")
    name = f"kubegate-{target.connection}"
    cluster: dict[str, Any] = {"server": target.server}
    if target.insecure:
        cluster["insecure-skip-tls-verify"] = True
    elif target.ca_file:
        cluster["certificate-authority-data"] = base64.b64encode(Path(target.ca_file).read_bytes()).decode()
    args = ["credential", "--gateway", target.gateway, "--connection", target.connection]
    if target.ca_file:
        args += ["--certificate-authority", str(Path(target.ca_file).resolve())]
    if target.insecure:
        args.append("--insecure-skip-tls-verify")
    user = {
        "exec": {
            "apiVersion": EXEC_API_VERSION,
            "command": command,
            "args": args,
            "interactiveMode": "Never",  # the login needs no stdin: it waits for the browser
            "provideClusterInfo": False,
        }
    }
    _upsert(config, "clusters", name, "cluster", cluster)
    _upsert(config, "users", name, "user", user)
    _upsert(config, "contexts", name, "context", {"cluster": name, "user": name})
    if set_current or not config.get("current-context"):
        config["current-context"] = name
    text = yaml.safe_dump(config, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, text)
    return name


def _upsert(config: dict[str, Any], section: str, name: str, key: str, value: dict[str, Any]) -> None:
    entries = config.get(section) or []
    entries = [e for e in entries if not (isinstance(e, dict) and e.get("name") == name)]
    entries.append({"name": name, key: value})
    config[section] = entries


def logout(target: Target) -> str | None:
    """Revoke the cached token at the gateway and forget it; returns the revoked token id."""
    cached = forget_cached(target)
    if not cached or not isinstance(cached.get("token"), str):
        return None
    status, answer = _post(target, "/login/logout", {}, token=cached["token"])
    if status != 200:
        raise ClientError(f"the gateway did not revoke the token ({status}): {answer.get('error', '')}")
    revoked = answer.get("revoked") or []
    return revoked[0] if revoked else cached.get("id")
