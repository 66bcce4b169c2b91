"""kubegate benchmark: the gateway vs direct vs nginx vs mitmproxy, in front of the same upstream, in one run.

    bench/run                       # everything, about 4 minutes; rewrites the results in docs/performance.md
    bench/run --duration 3 --no-doc # a quick look, nothing written but bench/results/

Not a test: nothing here asserts a timing. It measures, prints a Markdown report and (unless --no-doc)
writes it between the markers in docs/performance.md. Raw numbers go to bench/results/RUN.json.

Contenders, all TLS on loopback, all in front of one stand-in API server (bench/upstream.py):
  direct     the client talks to the upstream itself;
  gateway    `kubegate serve` with a generated config, only the static-tokens plugin enabled;
  gateway-oidc  the same with only the oidc plugin enabled (a JWKS served over http on loopback by
             bench/upstream.py, one RS256 JWT minted per run): small GET only, for the cost of
             authentication next to static tokens (its verified-token cache is the hot path);
  gateway-login  the same with only the login plugin enabled and a gateway token minted into its SQLite
             database (one lookup per second, revocation_check_seconds): small GET only;
  nginx      Debian's nginx, one worker, TLS reverse proxy with an upstream keepalive pool;
  mitmproxy  mitmdump --mode reverse:UPSTREAM (own venv: bench/.venv-mitm);
  agent      the gateway (static-tokens only) with a `type: agent` connection: each request goes through the
             tunnel (data links: TLS connections asked for over SSH) to a `kubegate agent` (enrolled with a
             join token at start) that holds the upstream credential and forwards to the same upstream;
             compared with `gateway` in every round.

Measured: small GET (one pod) and a 500-pod list at concurrency 1 and 32 with wrk (req/s, p50, p99);
exec stdout throughput over a v5.channel.k8s.io WebSocket (MB/s); the gateway's RSS with 1,000 open watches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MITM_VENV = HERE / ".venv-mitm"
MITM_REQUIREMENT = "mitmproxy>=11,<13"
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

CONTENDERS = (
    "direct", "gateway", "gateway-2w", "gateway-full", "gateway-oidc", "gateway-login", "agent", "nginx",
    "mitmproxy", "aiohttp-ref",
)  # fmt: skip
# aiohttp-ref (bench/reference_proxy.py) is an opt-in experiment; so is gateway-2w (the gateway contender
# with `workers: 2`, to set 1 and 2 worker processes side by side: --contenders direct,gateway,gateway-2w).
DEFAULT_CONTENDERS = tuple(c for c in CONTENDERS if c not in ("aiohttp-ref", "gateway-2w"))
POD_PATH = "/api/v1/namespaces/prod/pods/web"
LIST_PATH = "/api/v1/namespaces/prod/pods"
WATCH_PATH = "/api/v1/namespaces/prod/pods?watch=true"
WORKLOADS = {"small GET (1 pod)": POD_PATH, "list (500 pods)": LIST_PATH}
SMALL = "small GET (1 pod)"
# gateway-oidc measures the cost of authentication, which is per request: the small GET shows it best and
# keeps the contender cheap (no list, exec or watches cells).
ONLY_WORKLOADS = {"gateway-oidc": {SMALL}, "gateway-login": {SMALL}}
AUTH_CONTENDERS = {"gateway-oidc": "oidc", "gateway-login": "login (gateway token)"}
OIDC_AUDIENCE = "kubegate-bench"
CONNECTION = "bench"
AGENT_NAME = "bench-agent"
MB = 1_000_000
# gateway-full: the plugins a deployment runs (issue 15), with a policy of ten rules of the usual kinds
# (the demo's, plus three), none of which matches the benchmark's GETs: every rule is evaluated, the
# default allows.
FULL_POLICY = {
    "default": "allow",
    "rules": [
        {"name": "bots-never-delete-in-prod", "action": "deny", "message": "CI may not delete in prod",
         "match": {"groups": ["ci"], "verbs": ["delete", "deletecollection"], "namespaces": ["prod"]}},
        {"name": "deletes-in-prod", "action": "approve", "message": "deleting in prod needs a reviewer",
         "match": {"verbs": ["delete", "deletecollection"], "namespaces": ["prod"]},
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 600}},
        {"name": "shell-into-prod", "action": "approve", "message": "contractors need a reviewer for a shell",
         "match": {"resources": ["pods/exec", "pods/attach"], "namespaces": ["prod"], "groups": ["contractors"]},
         "approval": {"reviewer_groups": ["reviewers"], "scope": "window", "window_seconds": 3600}},
        {"name": "debug-containers-in-prod", "action": "approve", "message": "kubectl debug in prod",
         "match": {"resources": ["pods/ephemeralcontainers"], "namespaces": ["prod"]},
         "approval": {"reviewer_groups": ["reviewers"], "scope": "window", "window_seconds": 3600}},
        {"name": "reach-prod-containers", "action": "approve", "message": "port-forward and proxy in prod",
         "match": {"resources": ["pods/portforward", "pods/proxy", "services/proxy"], "namespaces": ["prod"]},
         "approval": {"reviewer_groups": ["reviewers"], "scope": "window", "window_seconds": 3600}},
        {"name": "evictions-in-prod", "action": "approve", "message": "an eviction deletes the pod",
         "match": {"resources": ["pods/eviction"], "namespaces": ["prod"]},
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 600}},
        {"name": "scaling-in-prod", "action": "approve", "message": "scaling a prod workload",
         "match": {"resources": ["deployments/scale", "statefulsets/scale"], "verbs": ["update", "patch"],
                   "namespaces": ["prod"]},
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 600}},
        {"name": "no-secret-reads-for-ci", "action": "deny", "message": "CI reads no Secrets",
         "match": {"groups": ["ci"], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}},
        {"name": "rbac-changes", "action": "approve", "message": "RBAC changes need a reviewer",
         "match": {"resources": ["clusterrolebindings", "rolebindings", "clusterroles", "roles"],
                   "verbs": ["create", "update", "patch", "delete"]},
         "approval": {"reviewer_groups": ["reviewers"], "ttl_seconds": 600}},
        {"name": "nodes-are-read-only", "action": "deny", "message": "nodes are managed by the platform team",
         "match": {"resources": ["nodes"], "verbs": ["create", "update", "patch", "delete"]}},
    ],
}  # fmt: skip


class BenchError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def checkout_revision(revision: str, into: Path) -> Path:
    """The tree of git `revision` extracted into `into`; returns its `.typecheck/` directory, through whose
    links that revision's code imports as `kubegate` (a `--baseline` beside the working tree)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"--baseline {revision}: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    if not (into / ".typecheck" / "kubegate").is_dir():
        raise BenchError(f"--baseline {revision}: no .typecheck/ tree at that revision")
    return into / ".typecheck"


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------------------


class Processes:
    """Every process the run starts, each in its own session, so cleanup can end it and its children."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        say(f"starting {name}: {shlex.join(argv)}")
        out = kwargs.pop("stdout", None)
        log_file = open(log, "wb")
        try:
            proc = subprocess.Popen(
                argv, stdout=out or log_file, stderr=log_file, start_new_session=True, **kwargs
            )
        except OSError as exc:
            raise BenchError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 8.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.procs)):
            self.stop(proc)


PROCS = Processes()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    ".join(text[-lines:]) or "(empty log)"


def insecure_context() -> ssl.SSLContext:
    # Every listener here has a throwaway certificate; the handshake is still a real TLS handshake.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http_get(url: str, token: str, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=insecure_context(), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    name: str, proc: subprocess.Popen, url: str, token: str, log: Path, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} while starting; its log ({log}):\n    {log_tail(log)}"
            )
        try:
            status, _ = http_get(url, token, timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(
        f"{name} did not answer {url} within {timeout:.0f}s (last: {last}); its log ({log}):\n    {log_tail(log)}"
    )


def wait_indexed(name: str, metrics_url: str, timeout: float = 60.0) -> None:
    """Until the masking gateway searches the upstream's known Secret values by Hyperscan's literal database
    (compiled in a thread after the first listing, 1-3 s of CPU): otherwise the first round measures the
    compilation and the slower automaton."""
    deadline = time.monotonic() + timeout
    forms = literal = ""
    while time.monotonic() < deadline:
        try:
            _, body = http_get(metrics_url, "", timeout=2)
        except OSError:
            body = b""
        text = body.decode(errors="replace")
        forms = next((line.rsplit(" ", 1)[1] for line in text.splitlines()
                      if line.startswith(f'kubegate_masking_known_forms{{connection="{CONNECTION}"}}')), "")  # fmt: skip
        literal = next((line.rsplit(" ", 1)[1] for line in text.splitlines()
                        if line.startswith(f'kubegate_masking_known_literal{{connection="{CONNECTION}"}}')), "")  # fmt: skip
        if forms and float(forms) > 0 and literal and float(literal) == 1:
            say(f"{name}: {float(forms):.0f} known-value forms indexed (Hyperscan)")
            return
        time.sleep(0.3)
    say(f"{name}: known values not indexed by Hyperscan after {timeout:.0f} s (forms {forms or '?'}, literal "
        f"{literal or '?'}); measuring anyway")  # fmt: skip


# -- tools -----------------------------------------------------------------------------------------------


def ensure_tools(contenders: list[str]) -> None:
    missing = [tool for tool in ("wrk", *(["nginx"] if "nginx" in contenders else [])) if not find_tool(tool)]
    if missing:
        if os.geteuid() != 0:
            raise BenchError(f"missing {', '.join(missing)}: run `sudo apt-get install -y nginx wrk` first")
        say(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"apt-get install {' '.join(missing)} failed:\n{done.stderr[-2000:]}")
        # Debian's package may start its own nginx on port 80: the benchmark runs its own, so stop only
        # a daemon that the install just started (it writes /run/nginx.pid).
        if "nginx" in missing and Path("/run/nginx.pid").exists():
            subprocess.run([find_tool("nginx") or "nginx", "-s", "quit"], capture_output=True, check=False)
    if "mitmproxy" in contenders and not (MITM_VENV / "bin" / "mitmdump").exists():
        say(
            f"installing {MITM_REQUIREMENT} into {MITM_VENV.relative_to(ROOT)} (its own venv: it pins old h2/cryptography)"
        )
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(MITM_VENV)], check=True)
        done = subprocess.run(
            [str(MITM_VENV / "bin" / "pip"), "install", "-q", MITM_REQUIREMENT],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(MITM_VENV, ignore_errors=True)
            raise BenchError(f"pip install {MITM_REQUIREMENT} failed:\n{done.stderr[-2000:]}")


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this run and the children it reaped)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:3]) / ticks  # user, nice, system: interrupts and steal are charged to no process
    own = sum(
        resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return busy, own


def wait_until_quiet(limit_s: float, share: float = 0.15) -> float:
    """Wait (up to limit_s) for a 2 s window in which other processes use under `share` of the machine."""
    deadline = time.monotonic() + limit_s
    while True:
        start = cpu_seconds()[0]
        time.sleep(2)
        used = (cpu_seconds()[0] - start) / 2 / (os.cpu_count() or 1)
        if used < share or time.monotonic() >= deadline:
            return used
        say(f"machine busy ({100 * used:.0f} % CPU used by other processes); waiting for it to quiet down")


def add_wait_quiet(parser: argparse.ArgumentParser) -> None:
    """`--wait-quiet SECONDS`, shared by the benchmark scripts (see `wait_until_quiet`)."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other processes to use under 15%% of the CPUs",
    )


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- contenders ------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base: str  # URL prefix under which /api/v1/... is reached
    token: str
    proc: subprocess.Popen | None = None
    agent_proc: subprocess.Popen | None = None  # the `kubegate agent` behind an agent contender
    masks: bool = False  # its answers go through masking: not the upstream's bytes (see _masked_answer)

    def url(self, path: str) -> str:
        return self.base + path


@dataclass
class Upstream:
    url: str
    port: int
    ca_file: Path
    token: str
    proc: subprocess.Popen
    jwks_url: str | None = None


def make_oidc_keys(work: Path) -> tuple[Path, object]:
    """A fresh RSA key; its public JWKS is written for bench/upstream.py to serve at /jwks."""
    from joserfc.jwk import KeySet, RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "bench-rsa", "use": "sig"})
    path = work / "jwks.json"
    path.write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    return path, key


def mint_oidc_token(key: object, issuer: str) -> str:
    from joserfc import jwt

    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": OIDC_AUDIENCE,
        "sub": "bench",
        "groups": ["bench"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    return jwt.encode({"alg": "RS256", "kid": "bench-rsa"}, claims, key, algorithms=["RS256"])


def start_upstream(work: Path, jwks_file: Path | None = None) -> Upstream:
    log = work / "upstream.log"
    proc = PROCS.start(
        "upstream",
        [
            sys.executable,
            str(HERE / "upstream.py"),
            "--dir",
            str(work / "upstream"),
            *(["--jwks", str(jwks_file)] if jwks_file else []),
        ],
        log,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.wait(5)
        raise BenchError(f"the stand-in upstream did not start; its log ({log}):\n    {log_tail(log)}")
    info = json.loads(line)
    up = Upstream(info["url"], info["port"], Path(info["ca_file"]), info["token"], proc, info.get("jwks_url"))
    wait_ready("upstream", proc, up.url + POD_PATH, up.token, log)
    return up


def gateway_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def start_kubegate_serve(label: str, config: Path, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """`kubegate serve --config CONFIG` as a bench process (the venv's script, or the module)."""
    exe = Path(sys.executable).parent / "kubegate"
    argv = (
        [str(exe), "serve", "--config", str(config)]
        if exe.exists()
        else [sys.executable, "-m", "kubegate.core.cli", "serve", "--config", str(config)]
    )
    return PROCS.start(label, argv, log, cwd=str(cwd))


def start_gateway(
    work: Path,
    up: Upstream,
    label: str = "gateway",
    extra_limits: dict | None = None,
    oidc_key: object | None = None,
    login: bool = False,
    masking: bool | dict[str, object] = False,
    agent: bool = False,
    full: bool = False,
    workers: int = 1,
    name: str = "",
) -> Target:
    """`kubegate serve` with one connection and only static-tokens enabled, or only oidc with oidc_key, or
    only login (a gateway token minted into the gateway's database beforehand). With `agent`, the connection
    is `type: agent` (no address, no credential) and a `kubegate agent` enrolled for it serves it over its
    SSH tunnel (Target.agent_proc). `workers`: the config's `workers` (gateway processes); `name`: the
    contender's name when the flags do not say it (gateway-2w)."""
    token, digest = gateway_token()
    port = free_port()
    gdir = work / label
    gdir.mkdir(parents=True, exist_ok=True)
    limits = "".join(f"\n  {k}: {v}" for k, v in (extra_limits or {}).items())
    if login:
        from kubegate.core.db import Database
        from kubegate.plugins.login import store

        database = Database(f"sqlite:///{gdir / 'state' / 'kubegate.db'}")
        token, _ = database.call(
            lambda s: store.mint_token(
                s, {"user": "bench", "groups": ["bench"], "method": "oidc"}, ttl_seconds=86400,
                connection=None, description="bench",
            )
        )  # fmt: skip
        database.close()
        plugin = "login"
        plugins = "      login: {}\n"
    elif oidc_key is None:
        plugin = "static-tokens"
        plugins = f"""      static-tokens:
        tokens:
          - user: bench
            groups: [bench]
            sha256: {digest}
"""
    else:
        if not up.jwks_url:
            raise BenchError("gateway-oidc needs the upstream to serve /jwks (started with --jwks)")
        issuer = "http://127.0.0.1/bench-issuer"  # only compared with the token's iss (jwks_url is set)
        token = mint_oidc_token(oidc_key, issuer)
        # cache_ttl_seconds 3600: the verified-token cache then holds the token until its exp, for the
        # whole run (the default, 300 s, would re-verify it once in a long run).
        plugin = "oidc"
        plugins = f"""      oidc:
        issuers:
          - issuer: {issuer}
            audiences: [{OIDC_AUDIENCE}]
            jwks_url: {up.jwks_url}
            algorithms: [RS256]
            cache_ttl_seconds: 3600
"""
    if full:
        # JSON is YAML's flow style. Known-values masking learns the upstream's Secrets (bench/upstream.py
        # serves a list and a quiet watch); audit-db writes to the gateway's SQLite database.
        plugin = "static-tokens, policy, approvals, masking, audit-db and recording"
        plugins += "".join(
            f"      {name}: {json.dumps(settings)}\n"
            for name, settings in (
                ("policy", FULL_POLICY), ("approvals", {}), ("masking", {}), ("audit-db", {}), ("recording", {})
            )
        )  # fmt: skip
    if masking:
        # A dict: the masking plugin's settings (JSON is YAML's flow style).
        settings = json.dumps(masking if isinstance(masking, dict) else {})
        plugin, plugins = "static-tokens and masking", plugins + f"      masking: {settings}\n"
    ssh_port = free_port() if agent else 0
    upstream = (
        "    type: agent\n    upstream: {}\n"
        if agent
        else f"""    upstream:
      server: {up.url}
      certificate_authority: {up.ca_file}
      token_file: {work / "upstream" / "token"}
"""
    )
    agents = f"plugins:\n  agents:\n    listen: 127.0.0.1:{ssh_port}\n" if agent else ""
    config = gdir / "kubegate.yaml"
    config.write_text(
        f"""# generated by bench/run.py: one connection, only the {plugin} plugin enabled
listen: 127.0.0.1:{port}
state_dir: {gdir / "state"}
log_level: warning
workers: {workers}
{"limits:" + limits if limits else ""}
{agents}connections:
  {CONNECTION}:
{upstream}    plugins:
{plugins}"""
    )
    log = gdir / "gateway.log"
    proc = start_kubegate_serve(label, config, log, gdir)
    name = name or (
        "agent" if agent else "gateway-full" if full else "gateway-login" if login
        else "gateway" if oidc_key is None else "gateway-oidc"
    )  # fmt: skip
    target = Target(
        name, f"https://127.0.0.1:{port}/k8s/{CONNECTION}", token, proc, masks=full or bool(masking)
    )
    if not agent:
        wait_ready(label, proc, target.url(POD_PATH), token, log)  # for oidc: the one full verification
        if target.masks:
            wait_indexed(label, f"https://127.0.0.1:{port}/metrics")
        return target
    target.agent_proc = start_bench_agent(work, up, label, config, ssh_port, proc, log)
    try:
        wait_ready(label, proc, target.url(POD_PATH), token, log)  # 503 until the tunnel is up
    except BenchError as exc:
        agent_log = work / f"{label}-agent" / "agent.log"
        raise BenchError(f"{exc}\n  the agent's log ({agent_log}):\n    {log_tail(agent_log)}") from None
    return target


def start_bench_agent(
    work: Path, up: Upstream, label: str, gateway_config: Path, ssh_port: int,
    gateway: subprocess.Popen[bytes], gateway_log: Path,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """Enrol and start a `kubegate agent` for the gateway `label`: wait for its SSH listener, mint a join
    token with `kubegate agents join-token`, write agent.yaml (the upstream's address and token, as a
    kubernetes connection would hold them) and start the agent. Its default log level: one line per
    request on its log, as it runs in production."""
    deadline = time.monotonic() + 30
    while True:  # the listener is up once the gateway's host key exists: join-token then prints that key
        if gateway.poll() is not None:
            raise BenchError(
                f"{label} exited while starting; its log ({gateway_log}):\n    {log_tail(gateway_log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ssh_port), timeout=1):
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"{label}: no SSH listener on port {ssh_port}; its log:\n    {log_tail(gateway_log)}"
            )
        time.sleep(0.2)
    exe = Path(sys.executable).parent / "kubegate"
    kubegate = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubegate.core.cli"]
    joined = subprocess.run(
        [*kubegate, "agents", "join-token", "-c", str(gateway_config), "--connection", CONNECTION,
         "--name", AGENT_NAME, "-o", "json"],
        capture_output=True, text=True, timeout=60, cwd=str(gateway_config.parent),
    )  # fmt: skip
    if joined.returncode != 0:
        raise BenchError(f"kubegate agents join-token failed: {joined.stderr.strip()[-1500:]}")
    grant = json.loads(joined.stdout)
    adir = work / f"{label}-agent"
    adir.mkdir(parents=True, exist_ok=True)
    agent_config = adir / "agent.yaml"
    agent_config.write_text(
        json.dumps(  # JSON is YAML
            {
                "name": AGENT_NAME,
                "gateways": [f"127.0.0.1:{ssh_port}"],
                "gateway_host_key": grant["host_key"],
                "identity_file": str(adir / "id_ed25519"),
                "connections": {
                    CONNECTION: {
                        "server": up.url,
                        "certificate_authority": str(up.ca_file),
                        "token_file": str(work / "upstream" / "token"),
                    }
                },
                "max_backoff_seconds": 2,
            },
            indent=2,
        )
    )
    return PROCS.start(
        f"kubegate agent for {label}",
        [*kubegate, "agent", "--config", str(agent_config), "--join-token", grant["token"]],
        adir / "agent.log",
        cwd=str(adir),
    )


NGINX_CONF = """# generated by bench/run.py
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 1000000;
    upstream apiserver {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass https://apiserver;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;  # the upstream certificate names localhost (nginx matches DNS names only)
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def start_nginx(work: Path, up: Upstream) -> Target:
    from kubegate.core.tls import ensure_self_signed

    ndir = work / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (ndir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    files = ensure_self_signed(ndir / "tls", common_name="bench-nginx", hostnames=["127.0.0.1"])
    port = free_port()
    conf = ndir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            dir=ndir,
            upstream_port=up.port,
            port=port,
            cert=files.cert,
            key=files.key,
            ca=up.ca_file,
        )
    )
    nginx = find_tool("nginx")
    if not nginx:
        raise BenchError("nginx is not installed (apt-get install nginx)")
    log = ndir / "nginx.out"
    check = subprocess.run(
        [nginx, "-t", "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise BenchError(f"nginx rejected its generated config {conf}:\n{check.stderr}")
    proc = PROCS.start("nginx", [nginx, "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf)], log)
    target = Target("nginx", f"https://127.0.0.1:{port}", up.token, proc)
    wait_ready("nginx", proc, target.url(POD_PATH), up.token, ndir / "error.log")
    return target


def start_mitmproxy(
    work: Path, up: Upstream, label: str = "mitmproxy", options: list[str] | None = None
) -> Target:
    mdir = work / label
    mdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = MITM_VENV / "bin" / "mitmdump"
    if not exe.exists():
        raise BenchError(f"mitmdump is not installed in {MITM_VENV} (bench/run installs it)")
    argv = [
        str(exe),
        "--mode",
        f"reverse:{up.url}",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={mdir}",
        "--set",
        "ssl_insecure=true",
        "--set",
        "flow_detail=0",
        "--set",
        "termlog_verbosity=warn",
        *(options or []),
    ]
    log = mdir / "mitmdump.log"
    proc = PROCS.start(label, argv, log)
    target = Target("mitmproxy", f"https://127.0.0.1:{port}", up.token, proc)
    wait_ready(label, proc, target.url(POD_PATH), up.token, log)
    return target


def start_reference(work: Path, up: Upstream) -> Target:
    from kubegate.core.tls import ensure_self_signed

    rdir = work / "aiohttp-ref"
    rdir.mkdir(parents=True, exist_ok=True)
    files = ensure_self_signed(rdir / "tls", common_name="bench-ref", hostnames=["127.0.0.1"])
    token, _ = gateway_token()
    port = free_port()
    argv = [
        sys.executable,
        str(HERE / "reference_proxy.py"),
        "--upstream",
        up.url,
        "--ca",
        str(up.ca_file),
        "--token-file",
        str(work / "upstream" / "token"),
        "--gateway-token",
        token,
        "--port",
        str(port),
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
    ]
    log = rdir / "reference.log"
    proc = PROCS.start("aiohttp-ref", argv, log)
    target = Target("aiohttp-ref", f"https://127.0.0.1:{port}/k8s/{CONNECTION}", token, proc)
    wait_ready("aiohttp-ref", proc, target.url(POD_PATH), token, log)
    return target


# -- measurements ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    contender: str
    workload: str
    concurrency: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    bytes_per_response: float = 0.0
    note: str = ""
    round: int = 0
    rps_min: float = 0.0
    rps_max: float = 0.0


def aggregate(raw: list[Cell]) -> list[Cell]:
    """One cell per (contender, workload, concurrency): medians over the rounds, errors summed."""
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in raw:
        groups.setdefault((cell.contender, cell.workload, cell.concurrency), []).append(cell)
    out = []
    for (contender, workload, conc), cells in groups.items():
        out.append(
            Cell(
                contender=contender,
                workload=workload,
                concurrency=conc,
                rps=statistics.median(c.rps for c in cells),
                p50_ms=statistics.median(c.p50_ms for c in cells),
                p99_ms=statistics.median(c.p99_ms for c in cells),
                requests=sum(c.requests for c in cells),
                errors=sum(c.errors for c in cells),
                bytes_per_response=statistics.median(c.bytes_per_response for c in cells),
                note="; ".join(c.note for c in cells if c.note),
                round=len(cells),
                rps_min=min(c.rps for c in cells),
                rps_max=max(c.rps for c in cells),
            )
        )
    return out


def per_round(
    raw: list[Cell], a: str, b: str, workload: str, conc: int, value: Callable[[Cell, Cell], float]
) -> list[float]:
    """value(cell of a, cell of b) for every round that measured both."""
    rounds: dict[int, dict[str, Cell]] = {}
    for cell in raw:
        if cell.workload == workload and cell.concurrency == conc:
            rounds.setdefault(cell.round, {})[cell.contender] = cell
    return [value(r[a], r[b]) for r in rounds.values() if a in r and b in r]


def run_wrk(url: str, token: str, connections: int, seconds: float) -> dict:
    wrk = find_tool("wrk")
    argv = [
        wrk or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "report.lua"),
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "BENCH_TOKEN": token}, timeout=seconds + 60
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise BenchError(f"wrk printed no summary for {url}:\n{done.stdout}\n{done.stderr}")


def _masked_answer(body: bytes, expected_size: int) -> bool:
    """A masking gateway re-encodes the JSON objects it reads (and masks what it finds): a whole Kubernetes
    object of about the upstream's size, not the upstream's bytes."""
    try:
        kind = json.loads(body).get("kind")
    except (ValueError, AttributeError):
        return False
    return bool(kind) and abs(len(body) - expected_size) <= expected_size // 5


def measure_requests(
    target: Target, workload: str, path: str, concurrency: int, seconds: float, expected_size: int
) -> Cell:
    url = target.url(path)
    status, body = http_get(url, target.token, timeout=30)
    masked_as_expected = target.masks and _masked_answer(body, expected_size)
    if status != 200 or (len(body) != expected_size and not masked_as_expected):
        raise BenchError(
            f"{target.name}: GET {url} answered {status} with {len(body)} bytes "
            f"(expected 200 with {expected_size}): {body[:200]!r}"
        )
    run_wrk(url, target.token, concurrency, 1)  # warm-up: connections, pools, caches
    raw = run_wrk(url, target.token, concurrency, seconds)
    requests = raw["requests"]
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    cell = Cell(
        contender=target.name,
        workload=workload,
        concurrency=concurrency,
        rps=requests / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=requests,
        errors=errors,
        bytes_per_response=raw["bytes"] / requests if requests else 0,
    )
    if errors:
        cell.note = (
            f"{errors} errors (status {raw['errors_status']}, timeout {raw['errors_timeout']}, "
            f"connect {raw['errors_connect']}, read {raw['errors_read']})"
        )
    say(
        f"  {target.name:<12} {workload:<18} c={concurrency:<2} {cell.rps:9.0f} req/s  "
        f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  {cell.note}"
    )
    return cell


async def exec_once(url: str, token: str, nbytes: int, limit_s: float) -> tuple[float, int]:
    import aiohttp

    exec_url = f"{url}/exec?command=head&command=-c&command={nbytes}&stdout=true"
    got = 0
    status = None
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        async with asyncio.timeout(limit_s):
            async with session.ws_connect(
                exec_url,
                protocols=("v5.channel.k8s.io",),
                headers={"Authorization": f"Bearer {token}"},
                ssl=insecure_context(),
                max_msg_size=0,
                autoping=True,
            ) as ws:
                if ws.protocol != "v5.channel.k8s.io":
                    raise BenchError(f"exec via {url}: negotiated subprotocol {ws.protocol!r}")
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        channel = msg.data[0]
                        if channel == 1:
                            got += len(msg.data) - 1
                        elif channel == 3:
                            status = json.loads(msg.data[1:])
                            break
                    else:
                        break
        elapsed = time.perf_counter() - start
    if got != nbytes or not status or status.get("status") != "Success":
        raise BenchError(f"exec via {url}: got {got} of {nbytes} bytes, status {status}")
    return elapsed, got


def measure_exec(target: Target, megabytes: int, runs: int) -> dict:
    url = target.url(POD_PATH)
    nbytes = megabytes * MB
    try:
        asyncio.run(exec_once(url, target.token, 4 * MB, 60))  # warm-up
        rates = []
        for _ in range(runs):
            elapsed, got = asyncio.run(exec_once(url, target.token, nbytes, 120))
            rates.append(got / elapsed / MB)
    except (BenchError, TimeoutError, OSError, Exception) as exc:
        say(f"  {target.name:<9} exec failed: {exc!r}")
        return {"contender": target.name, "mb_per_s": None, "runs": [], "note": f"failed: {exc!r}"[:200]}
    median = statistics.median(rates)
    say(f"  {target.name:<9} exec stdout {median:8.1f} MB/s (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    return {"contender": target.name, "mb_per_s": median, "runs": rates, "note": ""}


def rss_of(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


async def hold_watches(target: Target, count: int, measure: Callable[[], int], open_timeout: float) -> dict:
    import aiohttp

    url = target.url(WATCH_PATH)
    connector = aiohttp.TCPConnector(limit=0, ssl=insecure_context(), force_close=False)
    opened = 0
    failures: list[str] = []
    release = asyncio.Event()
    all_settled = asyncio.Event()
    gate = asyncio.Semaphore(64)  # opening pace: stays inside the listen backlogs

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened
        try:
            async with gate:
                resp = await session.get(url, headers={"Authorization": f"Bearer {target.token}"})
                if resp.status != 200:
                    failures.append(f"HTTP {resp.status}")
                    resp.release()
                    return
                line = await resp.content.readline()
                if b'"ADDED"' not in line:
                    failures.append(f"first event {line[:80]!r}")
                    resp.close()
                    return
                opened += 1
                if opened + len(failures) >= count:
                    all_settled.set()
            await release.wait()
            resp.close()
        except Exception as exc:  # counted and reported
            failures.append(repr(exc)[:120])
        finally:
            if opened + len(failures) >= count:
                all_settled.set()

    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        idle = measure()
        started = time.perf_counter()
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        # A timeout shows up in the report as fewer watches open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_settled.wait(), open_timeout)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)  # let buffers settle
        loaded = measure()
        held = opened
        release.set()
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()
    kinds: dict[str, int] = {}
    for failure in failures:
        kinds[failure] = kinds.get(failure, 0) + 1
    return {
        "contender": target.name,
        "watches": count,
        "opened": held,
        "open_seconds": open_seconds,
        "idle_rss_mb": idle / MB,
        "rss_mb": loaded / MB,
        "kb_per_watch": (loaded - idle) / 1000 / held if held else None,
        "failures": kinds,
    }


def measure_watches(target: Target, count: int, pid: int, agent_pid: int | None = None) -> dict:
    """hold_watches with the RSS of the proxy process `pid`; with `agent_pid` (the agent contender) the RSS
    is the gateway's plus the agent's, and each is also reported on its own (gateway_*/agent_* keys)."""
    readings: list[tuple[int, int]] = []

    def measure() -> int:
        gateway = rss_of(pid)
        agent = rss_of(agent_pid) if agent_pid is not None else 0
        readings.append((gateway, agent))
        return gateway + agent

    result = asyncio.run(hold_watches(target, count, measure, open_timeout=90))
    if agent_pid is not None and len(readings) == 2:
        (gw_idle, agent_idle), (gw_loaded, agent_loaded) = readings
        result.update(
            gateway_idle_rss_mb=gw_idle / MB, gateway_rss_mb=gw_loaded / MB,
            agent_idle_rss_mb=agent_idle / MB, agent_rss_mb=agent_loaded / MB,
        )  # fmt: skip
    extra = f", {sum(result['failures'].values())} failed: {result['failures']}" if result["failures"] else ""
    say(
        f"  {target.name:<9} {result['opened']}/{count} watches open in {result['open_seconds']:.1f}s: RSS "
        f"{result['idle_rss_mb']:.1f} MB idle -> {result['rss_mb']:.1f} MB"
        + (f" ({result['kb_per_watch']:.1f} KB/watch)" if result["kb_per_watch"] else "")
        + extra
    )
    return result


# -- report ----------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version_of(argv: list[str], pattern: str = r"([0-9][0-9A-Za-z.+~-]*)") -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "n/a"
        match = re.search(pattern, out.stdout + out.stderr)
        return match.group(1) if match else "n/a"

    from importlib.metadata import version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "n/a"

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "core", "connections", "plugins"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if commit and dirty:
        commit += " with uncommitted changes in core/connections/plugins"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kubegate": f"{pkg('kubegate')} (git {commit or '?'})",
        "hypercorn": pkg("hypercorn"),
        "uvicorn": pkg("uvicorn"),
        "httptools": pkg("httptools"),
        "aiohttp": pkg("aiohttp"),
        "uvloop": pkg("uvloop"),
        "nginx": version_of([find_tool("nginx") or "nginx", "-v"], r"nginx/(\S+)"),
        "wrk": version_of([find_tool("wrk") or "wrk", "-v"], r"wrk (\S+)"),
        "mitmproxy": version_of([str(MITM_VENV / "bin" / "mitmdump"), "--version"], r"Mitmproxy: (\S+)"),
        "openssl": ssl.OPENSSL_VERSION,
        "loadavg_before": os.getloadavg()[0],
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def find_cell(cells: list[Cell], contender: str, workload: str, concurrency: int) -> Cell | None:
    return next(
        (c for c in cells if (c.contender, c.workload, c.concurrency) == (contender, workload, concurrency)),
        None,
    )


def render(results: dict) -> str:
    facts, cells = results["machine"], [Cell(**c) for c in results["requests"]]
    raw = [Cell(**c) for c in results.get("requests_raw", [])]
    args = results["args"]
    out = [
        f"Command: `{results['command']}`",
        "",
        f"Run {facts['date']} on {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory_gib']} GiB, Linux "
        f"{facts['kernel']}; Python {facts['python']}, kubegate {facts['kubegate']} on uvicorn "
        f"{facts.get('uvicorn', '?')} (httptools {facts.get('httptools', '?')}), aiohttp {facts['aiohttp']}, "
        f"uvloop {facts['uvloop']}; nginx {facts['nginx']}, "
        f"mitmproxy {facts['mitmproxy']}, wrk {facts['wrk']}; {facts['openssl']}.",
        "",
        f"wrk: 1 thread, {args['duration']} s per cell after a 1 s warm-up, HTTP/1.1 keep-alive over TLS; "
        f"{args.get('rounds', 1)} rounds of the whole matrix, medians shown (targets: median of the per-round "
        "values, each round comparing contenders measured minutes apart at most). Load "
        "generator, proxy and upstream share the same "
        f"{facts['nproc']} CPUs (not pinned). 1-minute load average before the run "
        f"{facts['loadavg_before']:.2f}, after {results.get('loadavg_after', 0):.2f} (anything else running "
        "on the machine shows up here and in the numbers). "
        + (
            f"Processes not started by this run used {results['other_cpu']['seconds']:.0f} CPU-seconds during its "
            f"{results['other_cpu']['wall_seconds']:.0f} s ({100 * results['other_cpu']['share']:.0f} % of the "
            "machine)."
            if "other_cpu" in results
            else ""
        ),
        "",
        "### Requests",
        "",
        "aiohttp-ref, when present, is bench/reference_proxy.py: an experiment, not a product (see "
        "docs/performance.md).\n"
        if "aiohttp-ref" in args.get("contenders", [])
        else "",
        "| workload | conc. | contender | req/s | req/s min-max | p50 ms | p99 ms | p50 added vs direct | errors |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        for conc in args["concurrency"]:
            direct = find_cell(cells, "direct", workload, conc)
            for contender in CONTENDERS:
                cell = find_cell(cells, contender, workload, conc)
                if cell is None:
                    continue
                added = (
                    "—"
                    if contender == "direct" or direct is None
                    else f"{cell.p50_ms - direct.p50_ms:+.2f} ms"
                )
                out.append(
                    f"| {workload} | {conc} | {contender} | {cell.rps:,.0f} | "
                    f"{cell.rps_min:,.0f}-{cell.rps_max:,.0f} | {cell.p50_ms:.2f} | "
                    f"{cell.p99_ms:.2f} | {added} | {cell.errors or 0} |"
                )
    auth_rows = []
    for contender, plugin in AUTH_CONTENDERS.items():
        for conc in args["concurrency"]:
            static, other = find_cell(cells, "gateway", SMALL, conc), find_cell(cells, contender, SMALL, conc)
            if static and other:
                adds = per_round(raw, contender, "gateway", SMALL, conc, lambda o, g: o.p50_ms - g.p50_ms)
                added = statistics.median(adds) if adds else other.p50_ms - static.p50_ms
                runs = ", ".join(f"{a:+.2f}" for a in adds)
                auth_rows.append(
                    f"| {plugin} | {conc} | {static.p50_ms:.2f} | {other.p50_ms:.2f} | {added:+.2f} ms | {runs} | "
                    f"{static.rps:,.0f} | {other.rps:,.0f} |"
                )
    if auth_rows:
        out += [
            "",
            "### Authentication cost (vs static tokens, small GET)",
            "",
            "gateway-oidc and gateway-login are the same gateway with only the `oidc` plugin (RS256 JWT, JWKS "
            "over http on loopback; after the first request the token comes from the verified-token cache) or "
            "only the `login` plugin (a gateway token, looked up in SQLite at most once a second) enabled. Auth "
            "added p50 = that gateway's p50 - gateway (static-tokens) p50, median of the per-round differences.",
            "",
            "| plugin | conc. | static-tokens p50 ms | plugin p50 ms | auth added p50 | per round ms | "
            "static-tokens req/s | plugin req/s |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
            *auth_rows,
        ]
    out += (
        []
        if not results["exec"]
        else [
            "",
            f"### exec stdout throughput ({args['exec_mb']} MB per session, median of {args['exec_runs']})",
            "",
            "| contender | MB/s | runs | note |",
            "| --- | ---: | --- | --- |",
        ]
    )
    for row in results["exec"]:
        runs = ", ".join(f"{r:.0f}" for r in row["runs"])
        out.append(f"| {row['contender']} | {fmt(row['mb_per_s'], 1)} | {runs} | {row['note']} |")
    out += (
        []
        if not results["watches"]
        else [
            "",
            f"### Memory with {args['watches']:,} open watches (RSS of the proxy process, 1 MB = 10^6 bytes)",
            "",
            "| contender | watches open | idle RSS MB | RSS with watches MB | KB per watch | opened in | failures |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
    )
    for row in results["watches"]:
        fails = "; ".join(f"{n}x {k}" for k, n in row["failures"].items()) or "0"
        out.append(
            f"| {row['contender']}{' (gateway + agent)' if 'agent_rss_mb' in row else ''} | {row['opened']:,} | "
            f"{row['idle_rss_mb']:.1f} | {row['rss_mb']:.1f} | "
            f"{fmt(row['kb_per_watch'], 1)} | {row['open_seconds']:.1f} s | {fails} |"
        )
    tunnel_section, tunnel_targets = render_agent(results, cells, raw)
    out += tunnel_section
    full_section, full_targets = render_full(results, cells, raw)
    out += full_section
    out += [
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    small = "small GET (1 pod)"

    def spread(values: list[float], unit: str, digits: int = 2) -> str:
        if len(values) < 2:
            return ""
        return f"; per round {min(values):.{digits}f}-{max(values):.{digits}f}{unit}"

    for conc in args["concurrency"]:
        gw, mitm = find_cell(cells, "gateway", small, conc), find_cell(cells, "mitmproxy", small, conc)
        if gw and mitm and mitm.rps:
            ratios = per_round(raw, "gateway", "mitmproxy", small, conc, lambda g, m: g.rps / m.rps)
            ratio = statistics.median(ratios) if ratios else gw.rps / mitm.rps
            out.append(
                f"| ≥ 2.5x mitmproxy req/s, small GET, c={conc} | {ratio:.2f}x ({gw.rps:,.0f} vs "
                f"{mitm.rps:,.0f} req/s{spread(ratios, 'x')}) | {'yes' if ratio >= 2.5 else '**no**'} |"
            )
    gw, direct = find_cell(cells, "gateway", small, 1), find_cell(cells, "direct", small, 1)
    if gw and direct:
        adds = per_round(raw, "gateway", "direct", small, 1, lambda g, d: g.p50_ms - d.p50_ms)
        added = statistics.median(adds) if adds else gw.p50_ms - direct.p50_ms
        out.append(
            f"| ≤ 0.6 ms added p50, small GET, c=1 | {added:+.2f} ms ({gw.p50_ms:.2f} vs "
            f"{direct.p50_ms:.2f} ms{spread(adds, ' ms')}) | {'yes' if added <= 0.6 else '**no**'} |"
        )
    static, oidc = find_cell(cells, "gateway", small, 1), find_cell(cells, "gateway-oidc", small, 1)
    if static and oidc:
        adds = per_round(raw, "gateway-oidc", "gateway", small, 1, lambda o, g: o.p50_ms - g.p50_ms)
        added = statistics.median(adds) if adds else oidc.p50_ms - static.p50_ms
        out.append(
            f"| oidc authentication adds ≤ 0.1 ms p50 (vs static tokens), small GET, c=1 | {added:+.2f} ms "
            f"({oidc.p50_ms:.2f} vs {static.p50_ms:.2f} ms{spread(adds, ' ms')}) | "
            f"{'yes' if added <= 0.1 else '**no**'} |"
        )
    gw_exec = next((r for r in results["exec"] if r["contender"] == "gateway"), None)
    if gw_exec and gw_exec["mb_per_s"] is not None:
        out.append(
            f"| exec ≥ 100 MB/s | {gw_exec['mb_per_s']:.1f} MB/s | "
            f"{'yes' if gw_exec['mb_per_s'] >= 100 else '**no**'} |"
        )
    out += tunnel_targets
    out += full_targets
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)) + "\n"


def beside_gateway(results: dict, cells: list[Cell], contender: str) -> Iterator[tuple[str, int, Cell, Cell]]:
    """(workload, concurrency, the gateway's cell, `contender`'s cell) wherever both were measured."""
    for workload in WORKLOADS:
        for conc in results["args"]["concurrency"]:
            gw, other = (
                find_cell(cells, "gateway", workload, conc),
                find_cell(cells, contender, workload, conc),
            )
            if gw and other and gw.rps:
                yield workload, conc, gw, other


def render_agent(results: dict, cells: list[Cell], raw: list[Cell]) -> tuple[list[str], list[str]]:
    """The agent contender next to the gateway: a section of ratios (each the median of the per-round
    values: both are measured seconds apart in every round) and the issue's target rows."""
    if "agent" not in results["args"].get("contenders", []):
        return [], []
    section = [
        "",
        "### Through the agent tunnel (gateway → data link → kubegate agent → upstream, vs the gateway direct)",
        "",
        "Both gateways are the same static-tokens gateway; the agent contender's connection is `type: agent`. "
        "Ratios and added p50 are medians of the per-round values (the two are measured seconds apart).",
        "",
        "| workload | conc. | gateway req/s | agent req/s | agent / gateway req/s | gateway p50 ms | "
        "agent p50 ms | p50 added by the tunnel | per round (ratio; added ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    targets: list[str] = []
    for workload, conc, gw, tunnel in beside_gateway(results, cells, "agent"):
        ratios = per_round(raw, "agent", "gateway", workload, conc, lambda a, g: a.rps / g.rps)
        adds = per_round(raw, "agent", "gateway", workload, conc, lambda a, g: a.p50_ms - g.p50_ms)
        ratio = statistics.median(ratios) if ratios else tunnel.rps / gw.rps
        added = statistics.median(adds) if adds else tunnel.p50_ms - gw.p50_ms
        runs = "; ".join(f"{r:.2f}x, {a:+.2f}" for r, a in zip(ratios, adds, strict=False))
        section.append(
            f"| {workload} | {conc} | {gw.rps:,.0f} | {tunnel.rps:,.0f} | {ratio:.2f}x | {gw.p50_ms:.2f} | "
            f"{tunnel.p50_ms:.2f} | {added:+.2f} ms | {runs} |"
        )
        if workload == SMALL:
            span = f"; per round {min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else ""
            targets.append(
                f"| through the agent: ≥ 0.7x the gateway's req/s, small GET, c={conc} | {ratio:.2f}x "
                f"({tunnel.rps:,.0f} vs {gw.rps:,.0f} req/s{span}) | {'yes' if ratio >= 0.7 else '**no**'} |"
            )
            if conc == 1:
                span = f"; per round {min(adds):+.2f} to {max(adds):+.2f} ms" if len(adds) > 1 else ""
                targets.append(
                    f"| through the agent: ≤ +0.3 ms p50 over the gateway, small GET, c=1 | {added:+.2f} ms "
                    f"({tunnel.p50_ms:.2f} vs {gw.p50_ms:.2f} ms{span}) | "
                    f"{'yes' if added <= 0.3 else '**no**'} |"
                )
    execs = {r["contender"]: r for r in results["exec"]}
    gw_exec, tunnel_exec = execs.get("gateway"), execs.get("agent")
    if tunnel_exec:
        rate = tunnel_exec["mb_per_s"]
        versus = (
            f" ({rate / gw_exec['mb_per_s']:.2f}x the gateway's {gw_exec['mb_per_s']:.1f} MB/s)"
            if rate is not None and gw_exec and gw_exec["mb_per_s"]
            else ""
        )
        runs = ", ".join(f"{r:.0f}" for r in tunnel_exec["runs"])
        section += ["", f"exec stdout through the tunnel: {fmt(rate, 1)} MB/s{versus}; runs {runs or 'none'}"
                    f"{'; ' + tunnel_exec['note'] if tunnel_exec['note'] else ''}."]  # fmt: skip
        targets.append(
            f"| through the agent: exec ≥ 100 MB/s | {fmt(rate, 1)} MB/s{versus} | "
            f"{'yes' if rate is not None and rate >= 100 else '**no**'} |"
        )
    watch = next((w for w in results["watches"] if w["contender"] == "agent"), None)
    if watch:
        fails = "; ".join(f"{n}x {k}" for k, n in watch["failures"].items()) or "none"
        section += [
            "",
            f"{watch['watches']:,} concurrent watches through the tunnel (a fresh gateway and agent): "
            f"{watch['opened']:,} established and delivered their ADDED event in {watch['open_seconds']:.1f} s "
            f"(failures: {fails}). RSS: gateway {watch.get('gateway_idle_rss_mb', 0):.1f} → "
            f"{watch.get('gateway_rss_mb', 0):.1f} MB, agent {watch.get('agent_idle_rss_mb', 0):.1f} → "
            f"{watch.get('agent_rss_mb', 0):.1f} MB (idle → with the watches open); "
            f"{fmt(watch['kb_per_watch'], 1)} KB per watch for both together.",
        ]
        targets.append(
            f"| through the agent: {watch['watches']:,} concurrent watches established | {watch['opened']:,} "
            f"in {watch['open_seconds']:.1f} s | {'yes' if watch['opened'] == watch['watches'] else '**no**'} |"
        )
    return section, targets


def render_full(results: dict, cells: list[Cell], raw: list[Cell]) -> tuple[list[str], list[str]]:
    """gateway-full (every plugin a deployment runs) next to the static-tokens gateway, direct and
    mitmproxy: ratios as medians of the per-round values, and issue 15's target rows."""
    if "gateway-full" not in results["args"].get("contenders", []):
        return [], []
    section = [
        "",
        "### The full plugin chain (gateway-full vs the static-tokens gateway)",
        "",
        "gateway-full: static-tokens, policy (ten rules, none matching the benchmark's GETs), approvals, "
        "masking (known values learned from the upstream's Secrets), audit-db (SQLite) and recording. Ratios "
        "and added p50 are medians of the per-round values.",
        "",
        "| workload | conc. | gateway req/s | gateway-full req/s | full / gateway | full p50 added vs direct | "
        "full / mitmproxy | per round (full/gateway) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    targets: list[str] = []
    for workload, conc, gw, full in beside_gateway(results, cells, "gateway-full"):
        ratios = per_round(raw, "gateway-full", "gateway", workload, conc, lambda f, g: f.rps / g.rps)
        ratio = statistics.median(ratios) if ratios else full.rps / gw.rps
        adds = per_round(raw, "gateway-full", "direct", workload, conc, lambda f, d: f.p50_ms - d.p50_ms)
        added = statistics.median(adds) if adds else None
        mitm_ratios = per_round(raw, "gateway-full", "mitmproxy", workload, conc, lambda f, m: f.rps / m.rps)
        mitm = statistics.median(mitm_ratios) if mitm_ratios else None
        section.append(
            f"| {workload} | {conc} | {gw.rps:,.0f} | {full.rps:,.0f} | {ratio:.2f}x | "
            f"{'—' if added is None else f'{added:+.2f} ms'} | {'—' if mitm is None else f'{mitm:.2f}x'} | "
            f"{', '.join(f'{r:.2f}x' for r in ratios)} |"
        )
        if workload != SMALL:
            continue
        targets.append(
            f"| full chain ≥ 0.8x the static-tokens gateway's req/s, small GET, c={conc} | {ratio:.2f}x "
            f"({full.rps:,.0f} vs {gw.rps:,.0f} req/s) | {'yes' if ratio >= 0.8 else '**no**'} |"
        )
        if mitm is not None:
            targets.append(
                f"| full chain ≥ 3x mitmproxy req/s, small GET, c={conc} | {mitm:.2f}x | "
                f"{'yes' if mitm >= 3 else '**no**'} |"
            )
        if conc == 1 and added is not None:
            targets.append(
                f"| full chain ≤ 0.5 ms added p50 over direct, small GET, c=1 | {added:+.2f} ms | "
                f"{'yes' if added <= 0.5 else '**no**'} |"
            )
    return section, targets


def write_doc(report: str) -> None:
    block = f"{BEGIN}\n{report}{END}"
    if DOC.exists() and BEGIN in DOC.read_text() and END in DOC.read_text():
        text = DOC.read_text()
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(head + block + tail)
    else:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(f"# Performance\n\nMade by `bench/run` (see bench/run.py).\n\n{block}\n")
    say(f"wrote {DOC.relative_to(ROOT)}")


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/run")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk cell (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the request matrix; medians are reported (default 3)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)} (default: all but aiohttp-ref)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="`workers: N` for the gateway, gateway-full, gateway-oidc and gateway-login contenders (default 1; "
        "gateway-2w always has 2, agent 1)",
    )
    parser.add_argument("--exec-mb", type=int, default=256, help="stdout MB per exec session (default 256)")
    parser.add_argument("--exec-runs", type=int, default=3)
    parser.add_argument("--watches", type=int, default=1000)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: requests,exec,watches")
    add_wait_quiet(parser)
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/performance.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown or "direct" not in args.contenders or "gateway" not in args.contenders:
        parser.error(f"--contenders must include direct and gateway, from {', '.join(CONTENDERS)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    ensure_tools(args.contenders)
    limit = raise_fd_limit()
    if limit < args.watches * 3 + 100:
        raise BenchError(f"open-files limit is {limit}: {args.watches} watches need about {args.watches * 3}")
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-"))
    say(f"scratch directory {work}")
    results: dict = {
        "command": command,
        "args": {
            "duration": args.duration,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "exec_mb": args.exec_mb,
            "exec_runs": args.exec_runs,
            "watches": args.watches,
            "contenders": args.contenders,
            "workers": args.workers,
        },
        "requests": [],
        "exec": [],
        "watches": [],
    }
    if args.wait_quiet:
        say(f"busy share of other processes at start: {100 * wait_until_quiet(args.wait_quiet):.0f} %")
    cpu_start, wall_start = cpu_seconds(), time.monotonic()
    try:
        results["machine"] = machine_facts()
        oidc_jwks, oidc_key = make_oidc_keys(work) if "gateway-oidc" in args.contenders else (None, None)
        up = start_upstream(work, oidc_jwks)
        targets = [Target("direct", up.url, up.token)]
        starters = {
            "gateway": lambda: start_gateway(work, up, workers=args.workers),
            "gateway-2w": lambda: start_gateway(work, up, label="gateway-2w", workers=2, name="gateway-2w"),
            "gateway-full": lambda: start_gateway(
                work, up, label="gateway-full", full=True, workers=args.workers
            ),
            "gateway-oidc": lambda: start_gateway(
                work, up, label="gateway-oidc", oidc_key=oidc_key, workers=args.workers
            ),
            "gateway-login": lambda: start_gateway(
                work, up, label="gateway-login", login=True, workers=args.workers
            ),
            "agent": lambda: start_gateway(work, up, label="agent", agent=True),
            "nginx": lambda: start_nginx(work, up),
            "mitmproxy": lambda: start_mitmproxy(work, up),
            "aiohttp-ref": lambda: start_reference(work, up),
        }
        for name in CONTENDERS[1:]:
            if name in args.contenders:
                targets.append(starters[name]())
        sizes = {path: len(http_get(up.url + path, up.token, timeout=30)[1]) for path in WORKLOADS.values()}

        if "requests" not in args.skip:
            raw: list[Cell] = []
            for round_no in range(1, args.rounds + 1):
                say(f"requests (wrk), round {round_no} of {args.rounds}")
                for workload, path in WORKLOADS.items():
                    for conc in args.concurrency:
                        for target in targets:
                            if workload not in ONLY_WORKLOADS.get(target.name, {workload}):
                                continue
                            cell = measure_requests(target, workload, path, conc, args.duration, sizes[path])
                            cell.round = round_no
                            raw.append(cell)
            results["requests_raw"] = [asdict(c) for c in raw]
            results["requests"] = [asdict(c) for c in aggregate(raw)]
        if "exec" not in args.skip:
            say(f"exec stdout throughput ({args.exec_mb} MB x {args.exec_runs})")
            for target in targets:
                if target.name not in ("aiohttp-ref", *AUTH_CONTENDERS):  # REST only; auth is per request
                    results["exec"].append(measure_exec(target, args.exec_mb, args.exec_runs))
        for target in targets:
            for proc in (target.agent_proc, target.proc):
                if proc is not None:
                    PROCS.stop(proc)
        if "watches" not in args.skip:
            say(f"{args.watches} open watches (fresh processes)")
            # A fresh gateway, so its idle RSS is not inflated by the load above; default config (no cap on
            # upstream connections, so each watch holds its own).
            gw = start_gateway(work, up, label="gateway-watches")
            assert gw.proc is not None
            results["watches"].append(measure_watches(gw, args.watches, gw.proc.pid))
            PROCS.stop(gw.proc)
            if "agent" in args.contenders:
                tunnelled = start_gateway(work, up, label="agent-watches", agent=True)
                assert tunnelled.proc is not None and tunnelled.agent_proc is not None
                results["watches"].append(
                    measure_watches(tunnelled, args.watches, tunnelled.proc.pid, tunnelled.agent_proc.pid)
                )
                PROCS.stop(tunnelled.agent_proc)
                PROCS.stop(tunnelled.proc)
            if "nginx" in args.contenders:
                ng = start_nginx(work, up)
                assert ng.proc is not None
                results["watches"].append(measure_watches(ng, args.watches, ng.proc.pid))
                PROCS.stop(ng.proc)
    finally:
        PROCS.stop_all()
        results["loadavg_after"] = os.getloadavg()[0]
        cpu_end = cpu_seconds()
        wall = time.monotonic() - wall_start
        other = max(0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1]))
        results["other_cpu"] = {
            "seconds": other,
            "wall_seconds": wall,
            "share": other / wall / (os.cpu_count() or 1),
        }
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "bench/run" + (
        ""
        if argv is None and len(sys.argv) == 1
        else " " + shlex.join(sys.argv[1:] if argv is None else argv)
    )

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)  # also when started with SIGINT ignored (e.g. `bench/run &`)
    try:
        results = run(args, command)
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; all processes stopped")
        return 130
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    print(report)
    if not args.no_doc:
        write_doc(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
