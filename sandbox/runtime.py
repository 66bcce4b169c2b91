"""Pod runtime for the sandbox cluster: every container is a real process.

What a pod gets:

* a root directory ``ROOT/NS/NAME/`` that is the container's ``/``, and nothing outside it: every process
  of the pod (its containers, ``kubectl exec``, the ``tar`` of ``kubectl cp``) runs confined to it, so an
  absolute path, ``..`` or a symlink resolves inside the pod's tree, never on the host. The host's program
  directories (``/usr /bin /sbin /lib* /etc/alternatives``, the "image") are visible, with a few device
  nodes and ``/proc``; ``/etc`` is the pod's own (a small ``passwd``, ``group``, ``hosts``). Two ways to
  confine, chosen by ``KUBEGATE_SANDBOX_ISOLATION`` (``auto``, the default: the first that works here):

  - ``namespaces``: sandbox/confine.py enters user, mount and PID namespaces, binds the image read-only,
    mounts a /proc of the pod's own processes, chroots to the pod root and runs the command (as ``nobody``
    on the host when the sandbox runs as root). Needs Linux with unprivileged user namespaces (most
    distributions) or root. Costs one Python start per process (about 0.1 s here).
  - ``proot`` (Debian package ``proot``): the command runs under ``proot -r PODROOT`` with the image bound
    in. proot cannot bind read-only: a pod of a sandbox running as root could write to the host's /usr.

  When neither works (or ``KUBEGATE_SANDBOX_PROOT=0`` leaves no other), pods fail closed: containers stay
  waiting with ``RunContainerError`` and exec answers with one line saying what to install. No pod process
  ever runs unconfined. All containers of a pod share the one root (real containers have separate
  filesystems; pods share only volumes).
* each container's main process: ``command`` + ``args`` (``sleep infinity`` when neither is set) with the
  container's env (``value``, ``valueFrom`` secretKeyRef / configMapKeyRef / fieldRef, ``$(VAR)``
  expansion). Its stdin is a pipe when the container has ``stdin: true`` and a pty when it also has
  ``tty: true``; otherwise ``/dev/null`` like the kubelet does.
* output goes to a CRI-format log (``TIMESTAMP STREAM P|F line``, the kubelet's on-disk format) that
  ``pods/log`` serves, and to every attached client.
* for each TCP ``containerPort`` P an address on 127.0.0.1 (``port_address``: an ephemeral port the runtime
  listens on) that port-forward and the ``pods/proxy`` / ``services/proxy`` subresources connect to. Pods
  share the host's network, so a container cannot bind P itself; instead every container gets
  ``SANDBOX_LISTEN_PORT_P`` in its environment (a free port chosen for it) and connections to P's address are
  relayed to ``127.0.0.1:$SANDBOX_LISTEN_PORT_P`` when the pod listens there, e.g. a container running
  ``python3 -m http.server $(SANDBOX_LISTEN_PORT_8000) --bind 127.0.0.1``. While nothing listens there the
  runtime answers itself: an HTTP request gets ``hello from POD:P``, anything else is echoed back.
* ephemeral containers (``kubectl debug``) are started by ``start_ephemeral`` like any other container, in
  the same pod; one without ``command`` and ``args`` runs ``sh`` (what debug images such as busybox run),
  not ``sleep infinity``.

Containers are not restarted when they exit (restartPolicy is ignored); the exit shows in
``container_state``. ``envFrom`` is not supported (the resolvers only look up single keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import posixpath
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .confine import NOBODY, PROGRAM_DIRS, SYSTEM_DIRS

Resolver = Callable[[str, str, str], str | None]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ISOLATIONS = ("namespaces", "proot")
# Longest first: /etc/alternatives is the image's, the rest of /etc the pod's.
IMAGE_DIRS = sorted((*PROGRAM_DIRS, *SYSTEM_DIRS), key=len, reverse=True)
NO_ISOLATION = (
    "sandbox pods need isolation from the host and none works here: install proot, or allow unprivileged "
    "user namespaces (KUBEGATE_SANDBOX_ISOLATION={wanted})"
)
UNRESOLVABLE = "/dev/null/unresolvable"  # exists nowhere (ENOTDIR): what a too-long link chain maps to
CONFINE_SCRIPT = Path(__file__).with_name("confine.py")
# The pod's own /etc (the host's is not the pod's business): enough for id, whoami and localhost.
POD_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
}
READ_CHUNK = 32 * 1024
# Chunks queued per attached client before the container's output reader waits for it (backpressure).
ATTACH_QUEUE = 64


def rfc3339nano(ts: float | None = None) -> str:
    """Go's time.RFC3339Nano (what the kubelet uses): nanoseconds with trailing zeros trimmed, UTC 'Z'."""
    ns = time.time_ns() if ts is None else int(ts * 1e9)
    sec, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    f = f"{frac:09d}".rstrip("0")
    return f"{base}.{f}Z" if f else f"{base}Z"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ExecError(Exception):
    """The command could not be started (the runtime's message, as runc words it)."""


# ---------------------------------------------------------------------------------------------------
# Non-blocking fd helpers: pipes and pty masters are read/written as raw fds so that one code path
# serves both, and every read is awaited by its consumer (no unbounded buffering anywhere).
# ---------------------------------------------------------------------------------------------------
def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def read_fd(fd: int, n: int = READ_CHUNK) -> bytes:
    """Read up to n bytes; b'' at EOF (a pty master reports EIO once the slave side is gone)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF):
                return b""
            raise
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


async def write_fd(fd: int, data: bytes) -> None:
    """Write all of data, waiting while the pipe/pty is full. Raises OSError (EPIPE…) if the reader left."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)


def set_winsize(fd: int, width: int, height: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _make_controlling_tty() -> None:  # pragma: no cover - runs in the child between fork and exec
    # start_new_session already made the child a session leader; adopting fd 0 (the pty slave) as the
    # controlling terminal gives shells job control and delivers ^C as SIGINT to the foreground group.
    with contextlib.suppress(OSError):
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def kill_session(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group and every process of the session a pod process leads.

    Interactive shells put jobs in their own process groups, so killpg alone would leave them behind;
    all of them keep the session id, which the kubelet-less sandbox uses as the container boundary.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == pid:  # field 6 of stat: session id
                os.kill(int(entry), sig)
        except (OSError, ValueError, IndexError):
            continue


@dataclass(eq=False)  # identity semantics: kept in sets of a pod's running execs
class Process:
    """A running process with its stdio as raw non-blocking fds (None where not connected)."""

    proc: asyncio.subprocess.Process
    stdin: int | None
    stdout: int | None  # the pty master in tty mode (stdout+stderr merged)
    stderr: int | None
    tty: bool

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close_stdin(self) -> None:
        if self.tty:
            # A pty has no half-close: send the terminal's EOF character, as typing ^D would.
            if self.stdin is not None:
                with contextlib.suppress(OSError):
                    os.write(self.stdin, b"\x04")
            return
        _close(self.stdin)
        self.stdin = None

    def resize(self, width: int, height: int) -> None:
        if self.tty and self.stdout is not None:
            set_winsize(self.stdout, width, height)

    def kill(self) -> None:
        if self.proc.returncode is None:
            kill_session(self.pid)

    def close_fds(self) -> None:
        fds = {self.stdin, self.stdout, self.stderr}
        for fd in fds:
            _close(fd)
        self.stdin = self.stdout = self.stderr = None


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    log_path: Path
    process: Process | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    waiting: dict[str, str] | None = None
    attachers: set[asyncio.Queue[tuple[int, bytes] | None]] = field(default_factory=set)
    log_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    root: Path
    obj: dict[str, Any]
    containers: dict[str, Container] = field(default_factory=dict)
    ports: dict[int, tuple[str, int]] = field(default_factory=dict)  # containerPort -> local address
    # containerPort -> the local port the pod's own server for it listens on (SANDBOX_LISTEN_PORT_P)
    listen_ports: dict[int, int] = field(default_factory=dict)
    servers: list[asyncio.Server] = field(default_factory=list)
    execs: set[Process] = field(default_factory=set)
    stopped: bool = False


class PodRuntime:
    def __init__(
        self, root: Path, resolve_secret: Resolver, resolve_configmap: Resolver, isolation: str | None = None
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.resolve_secret = resolve_secret
        self.resolve_configmap = resolve_configmap
        # isolation: "auto", "namespaces" or "proot"; None reads KUBEGATE_SANDBOX_ISOLATION (default auto)
        self.wanted_isolation = isolation or os.environ.get("KUBEGATE_SANDBOX_ISOLATION", "auto")
        self.isolation, self.proot = choose_isolation(self.wanted_isolation)
        self._pods: dict[tuple[str, str], Pod] = {}
        self._lock = asyncio.Lock()

    @property
    def unconfined(self) -> str | None:
        """Why no pod process can run here (nothing confines it), or None when they run confined."""
        return None if self.isolation else NO_ISOLATION.format(wanted=self.wanted_isolation)

    # ---- lookup -------------------------------------------------------------------------------------
    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pods.get((namespace, name))

    def container(self, namespace: str, name: str, container: str) -> Container | None:
        pod = self.pod(namespace, name)
        return pod.containers.get(container) if pod else None

    def port_address(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        pod = self.pod(namespace, name)
        return pod.ports.get(port) if pod else None

    def pod_root(self, namespace: str, name: str) -> Path:
        return self.root / namespace / name

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start_pod(self, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta["name"]
        async with self._lock:
            existing = self._pods.get((ns, name))
            if existing and not existing.stopped and existing.uid == (meta.get("uid") or ""):
                return  # idempotent: already running this very pod
            if existing:
                # Same name, new pod (a different uid): it gets a fresh filesystem, like a new container.
                await self._stop(existing)
                self._remove(existing)
            root = self.pod_root(ns, name)
            for sub in ("tmp", "root", "var/tmp", "etc"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            for etc_file, content in POD_ETC.items():
                (root / "etc" / etc_file).write_text(content)
            (root / "etc" / "hostname").write_text(name + "\n")
            if self.isolation == "namespaces" and os.getuid() == 0:
                # confine.py runs the pods of a root sandbox as nobody: the pod's tree must be theirs.
                for path in [root, *root.rglob("*")]:
                    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
            p = Pod(ns, name, meta.get("uid") or "", root, pod)
            self._pods[(ns, name)] = p
            spec = pod.get("spec") or {}
            logdir = self.log_dir(p)
            for c in spec.get("containers") or []:
                cdir = logdir / c["name"]
                cdir.mkdir(parents=True, exist_ok=True)
                log = cdir / "0.log"
                log.touch()
                p.containers[c["name"]] = Container(c["name"], c, log)
            for c in spec.get("containers") or []:
                for port in c.get("ports") or []:
                    if (port.get("protocol") or "TCP") == "TCP" and "containerPort" in port:
                        await self._serve_port(p, int(port["containerPort"]))
            for c in p.containers.values():
                await self._start_container(p, c)
            for ec in spec.get("ephemeralContainers") or []:
                await self._add_ephemeral(p, ec)

    async def start_ephemeral(self, namespace: str, name: str, spec: dict[str, Any]) -> bool:
        """Start an ephemeral container in a running pod (the kubelet's half of `kubectl debug`).

        False when the pod is not running here; a container of that name that exists already is left alone.
        """
        async with self._lock:
            p = self._pods.get((namespace, name))
            if p is None or p.stopped:
                return False
            await self._add_ephemeral(p, spec)
            return True

    async def _add_ephemeral(self, p: Pod, spec: dict[str, Any]) -> None:
        if spec["name"] in p.containers:
            return
        cdir = self.log_dir(p) / spec["name"]
        cdir.mkdir(parents=True, exist_ok=True)
        log = cdir / "0.log"
        log.touch()
        if not spec.get("command") and not spec.get("args"):
            spec = {**spec, "command": ["sh"]}
        c = Container(spec["name"], spec, log)
        p.containers[spec["name"]] = c
        await self._start_container(p, c)

    async def stop_pod(self, namespace: str, name: str) -> None:
        async with self._lock:
            pod = self._pods.pop((namespace, name), None)
            if pod:
                await self._stop(pod)
                self._remove(pod)

    def _remove(self, pod: Pod) -> None:
        """A deleted pod's filesystem and logs go with it (the kubelet removes both)."""
        shutil.rmtree(pod.root, ignore_errors=True)
        shutil.rmtree(self.log_dir(pod), ignore_errors=True)

    def log_dir(self, pod: Pod) -> Path:
        return self.root / ".logs" / f"{pod.namespace}_{pod.name}_{pod.uid}"

    async def close(self) -> None:
        async with self._lock:
            pods = list(self._pods.values())
            self._pods.clear()
        await asyncio.gather(*(self._stop(p) for p in pods), return_exceptions=True)

    async def _stop(self, pod: Pod) -> None:
        pod.stopped = True
        for srv in pod.servers:
            srv.close()
        procs = [c.process for c in pod.containers.values() if c.process] + list(pod.execs)
        # SIGTERM first like the kubelet, then SIGKILL after a short grace (the sandbox has no time to
        # waste on terminationGracePeriodSeconds).
        for pr in procs:
            if pr.proc.returncode is None:
                kill_session(pr.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(pr.proc.wait() for pr in procs), return_exceptions=True), timeout=1.0
            )
        for pr in procs:
            pr.kill()
        await asyncio.gather(*(pr.proc.wait() for pr in procs), return_exceptions=True)
        for c in pod.containers.values():
            for t in c.tasks:
                t.cancel()
            await asyncio.gather(*c.tasks, return_exceptions=True)
            if c.process:
                c.process.close_fds()
            if c.exit_code is None and c.process is not None:
                c.exit_code = c.process.proc.returncode if c.process.proc.returncode is not None else 137
                c.finished_at = time.time()
            c.done.set()
            for q in list(c.attachers):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)
            async with c.log_changed:
                c.log_changed.notify_all()
        for pr in pod.execs:
            pr.close_fds()
        for srv in pod.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), timeout=1.0)

    # ---- environment --------------------------------------------------------------------------------
    def container_env(self, pod: Pod, spec: dict[str, Any]) -> dict[str, str]:
        """The environment the kubelet would give this container (raises ExecError on a missing ref)."""
        env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": pod.name, "HOME": "/root"}
        for port, local in sorted(pod.listen_ports.items()):
            env[f"SANDBOX_LISTEN_PORT_{port}"] = str(local)
        for var in spec.get("env") or []:
            name = var.get("name")
            if not name:
                continue
            if "value" in var:
                env[name] = expand_vars(str(var["value"]), env)
                continue
            src = var.get("valueFrom") or {}
            value: str | None = None
            if "secretKeyRef" in src or "configMapKeyRef" in src:
                is_secret = "secretKeyRef" in src
                ref = src["secretKeyRef" if is_secret else "configMapKeyRef"]
                resolve = self.resolve_secret if is_secret else self.resolve_configmap
                value = resolve(pod.namespace, ref.get("name", ""), ref.get("key", ""))
                if value is None:
                    if ref.get("optional"):
                        continue
                    kind = "Secret" if is_secret else "ConfigMap"
                    raise ExecError(
                        f"couldn't find key {ref.get('key')} in {kind} {pod.namespace}/{ref.get('name')}"
                    )
            elif "fieldRef" in src:
                value = field_value(pod.obj, src["fieldRef"].get("fieldPath", ""))
            if value is not None:
                env[name] = value
        return env

    def argv(
        self, pod: Pod, command: list[str], workdir: str = "/", terminal: str | None = None
    ) -> tuple[list[str], str]:
        """argv and host cwd to run `command` confined to the pod's root (ExecError when nothing confines).

        terminal: the pty slave the command gets, which proot binds (only it of the host's terminals).
        """
        workdir = workdir or "/"
        if self.isolation == "namespaces":
            launcher = [sys.executable, "-I", "-S", str(CONFINE_SCRIPT)]
            return [*launcher, str(pod.root), workdir, "--", *command], str(pod.root)
        if self.isolation == "proot" and self.proot:
            binds: list[str] = []
            for d in (*PROGRAM_DIRS, *SYSTEM_DIRS, *([terminal] if terminal else [])):
                if os.path.exists(d):
                    binds += ["-b", d]
            return [self.proot, "-r", str(pod.root), *binds, "-w", workdir, *command], str(pod.root)
        raise ExecError(self.unconfined or NO_ISOLATION)

    def host_path(self, pod: Pod, guest: str, workdir: str = "/") -> str:
        """The host path of a path as the pod sees it (see resolve_in_root)."""
        return resolve_in_root(pod.root, guest, workdir)

    def resolve_command(self, pod: Pod, cmd0: str, env: dict[str, str], workdir: str) -> None:
        """Fail the way runc does when the executable is missing (proot would only print its own error)."""
        if "/" in cmd0:
            host = self.host_path(pod, cmd0, workdir or "/")
            if not os.path.exists(host):
                raise ExecError(f'exec: "{cmd0}": stat {cmd0}: no such file or directory')
            if os.path.isdir(host) or not os.access(host, os.X_OK):
                raise ExecError(f'exec: "{cmd0}": permission denied')
            return
        for d in env.get("PATH", DEFAULT_PATH).split(":"):
            host = self.host_path(pod, posixpath.join(d or ".", cmd0), workdir or "/")
            if os.path.isfile(host) and os.access(host, os.X_OK):
                return
        raise ExecError(f'exec: "{cmd0}": executable file not found in $PATH')

    async def spawn(
        self,
        pod: Pod,
        command: list[str],
        env: dict[str, str],
        *,
        workdir: str = "/",
        stdin: bool,
        tty: bool,
    ) -> Process:
        """Start `command` in the pod. stdout/stderr are always captured; stdin is a pipe/pty or /dev/null."""
        argv, cwd = self.argv(pod, command, workdir)
        self.resolve_command(pod, command[0], env, workdir)
        if tty:
            master, slave = os.openpty()
            set_winsize(master, 80, 24)
            argv, cwd = self.argv(pod, command, workdir, terminal=os.ttyname(slave))
            env = {**env, "TERM": env.get("TERM", "xterm")}
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    # confine.py gives the command a session and the terminal inside the pod's namespace
                    preexec_fn=None if self.isolation == "namespaces" else _make_controlling_tty,
                )
            except OSError as exc:
                _close(master)
                raise ExecError(str(exc)) from exc
            finally:
                _close(slave)  # the child holds it now; EIO on the master then means "all gone"
            os.set_blocking(master, False)
            # A second fd for writing so closing stdin and reading output stay independent.
            wfd = os.dup(master)
            os.set_blocking(wfd, False)
            return Process(proc, wfd if stdin else None, master, None, True)
        in_r = in_w = None
        if stdin:
            in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=in_r if stdin else asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (in_w, out_r, err_r):
                _close(fd)
            raise ExecError(str(exc)) from exc
        finally:
            for fd in (in_r, out_w, err_w):
                _close(fd)
        for fd in (in_w, out_r, err_r):
            if fd is not None:
                os.set_blocking(fd, False)
        return Process(proc, in_w, out_r, err_r, False)

    # ---- containers ---------------------------------------------------------------------------------
    async def _start_container(self, pod: Pod, c: Container) -> None:
        spec = c.spec
        command = list(spec.get("command") or []) + list(spec.get("args") or [])
        if not command:
            command = [
                "sleep",
                "infinity",
            ]  # no image entrypoint to fall back to: idle like a pause container
        try:
            env = self.container_env(pod, spec)
            command = [expand_vars(str(a), env) for a in command]
            c.process = await self.spawn(
                pod,
                command,
                env,
                workdir=spec.get("workingDir") or "/",
                stdin=bool(spec.get("stdin")),
                tty=bool(spec.get("tty")) and bool(spec.get("stdin")),
            )
        except ExecError as exc:
            reason = "CreateContainerConfigError" if "couldn't find" in str(exc) else "RunContainerError"
            c.waiting = {"reason": reason, "message": str(exc)}
            c.done.set()
            return
        c.started_at = time.time()
        pr = c.process
        streams = [(1, pr.stdout)] + ([(2, pr.stderr)] if pr.stderr is not None else [])
        readers = [
            asyncio.create_task(self._pump_container(c, ch, fd)) for ch, fd in streams if fd is not None
        ]
        c.tasks += readers
        c.tasks.append(asyncio.create_task(self._reap(c, readers)))

    async def _pump_container(self, c: Container, channel: int, fd: int) -> None:
        stream = b"stdout" if channel == 1 else b"stderr"
        with c.log_path.open("ab", buffering=0) as log:
            while True:
                chunk = await read_fd(fd)
                if not chunk:
                    return
                write_cri(log, stream, chunk)
                async with c.log_changed:
                    c.log_changed.notify_all()
                for q in list(c.attachers):
                    await q.put((channel, chunk))  # slow attacher slows the container, like a full pipe

    async def _reap(self, c: Container, readers: list[asyncio.Task[None]]) -> None:
        assert c.process is not None
        rc = await c.process.proc.wait()
        # Output still buffered in the pipes/pty is part of the log; give the readers a moment to drain
        # (a background child that keeps the pipe open must not hold the container "running").
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), timeout=2.0)
        c.exit_code = rc if rc >= 0 else 128 - rc
        c.finished_at = time.time()
        c.done.set()
        for q in list(c.attachers):
            await q.put(None)
        async with c.log_changed:
            c.log_changed.notify_all()

    def container_state(self, namespace: str, name: str, container: str) -> dict[str, Any]:
        c = self.container(namespace, name, container)
        if c is None:
            return {"waiting": {"reason": "ContainerCreating"}}
        if c.waiting:
            return {"waiting": dict(c.waiting)}
        if c.exit_code is not None and c.started_at is not None:
            return {
                "terminated": {
                    "exitCode": c.exit_code,
                    "reason": "Completed" if c.exit_code == 0 else "Error",
                    "startedAt": rfc3339(c.started_at),
                    "finishedAt": rfc3339(c.finished_at or time.time()),
                }
            }
        if c.started_at is not None:
            return {"running": {"startedAt": rfc3339(c.started_at)}}
        return {"waiting": {"reason": "ContainerCreating"}}

    # ---- attach -------------------------------------------------------------------------------------
    def subscribe(self, c: Container) -> asyncio.Queue[tuple[int, bytes] | None]:
        q: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(ATTACH_QUEUE)
        c.attachers.add(q)
        return q

    def unsubscribe(self, c: Container, q: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        c.attachers.discard(q)

    # ---- ports --------------------------------------------------------------------------------------
    async def _serve_port(self, pod: Pod, port: int) -> None:
        label = f"{pod.name}:{port}"

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await self._relay_to_pod(pod, port, reader, writer):
                return
            try:
                first = await reader.read(READ_CHUNK)
                if not first:
                    return
                if HTTP_REQUEST.match(first):
                    buf = first
                    while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < 65536:
                        more = await reader.read(READ_CHUNK)
                        if not more:
                            break
                        buf += more
                    body = f"hello from {label}\n".encode()
                    head = (
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    ).encode()
                    writer.write(head + (b"" if buf.startswith(b"HEAD ") else body))
                    await writer.drain()
                    return
                # Anything else: echo, so byte-level tests can check both directions.
                data = first
                while data:
                    writer.write(data)
                    await writer.drain()
                    data = await reader.read(READ_CHUNK)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        pod.servers.append(server)
        pod.ports[port] = ("127.0.0.1", server.sockets[0].getsockname()[1])
        pod.listen_ports[port] = _free_local_port()

    async def _relay_to_pod(
        self, pod: Pod, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Relay a connection to the pod's own server for `port`; False (nothing done) when none listens."""
        local = pod.listen_ports.get(port)
        if local is None:
            return False
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", local)
        except OSError:
            return False

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(READ_CHUNK):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                pass

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (up_writer, writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
        return True

    # ---- logs ---------------------------------------------------------------------------------------
    async def stream_logs(
        self,
        namespace: str,
        name: str,
        container: str,
        *,
        follow: bool,
        tail_lines: int | None,
        timestamps: bool,
        limit_bytes: int | None,
    ) -> AsyncIterator[bytes]:
        c = self.container(namespace, name, container)
        if c is None:
            return
        remaining = limit_bytes if limit_bytes is not None and limit_bytes > 0 else None
        with c.log_path.open("rb") as f:
            data = f.read()
            entries, consumed = parse_cri(data)
            if tail_lines is not None and tail_lines >= 0:
                entries = tail_entries(entries, tail_lines)
            pos = consumed
            pending = data[consumed:]
            while True:
                for ts, _stream, content in entries:
                    out = (ts.encode() + b" " + content) if timestamps else content
                    if remaining is not None:
                        out = out[:remaining]
                        remaining -= len(out)
                    if out:
                        yield out
                    if remaining is not None and remaining <= 0:
                        return
                entries = []
                if not follow:
                    return
                # Follow: wait for the writer to append, until the container is gone and fully read.
                async with c.log_changed:
                    f.seek(pos)
                    chunk = f.read()
                    if not chunk:
                        if c.done.is_set():
                            f.seek(pos)
                            if not f.read():
                                return
                        else:
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(c.log_changed.wait(), timeout=5.0)
                            continue
                pending += chunk
                pos += len(chunk)
                entries, used = parse_cri(pending)
                pending = pending[used:]


def _free_local_port() -> int:
    """A loopback port free right now, for a pod's own server to bind (pods share the host's network)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


HTTP_REQUEST = re.compile(rb"^(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|CONNECT|TRACE) \S+ HTTP/1\.[01]\r?\n")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined names are replaced, undefined kept verbatim, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def field_value(pod: dict[str, Any], path: str) -> str | None:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName") or "sandbox",
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        v = simple[path]
        return None if v is None else str(v)
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        v = (meta.get(m.group(1)) or {}).get(m.group(2))
        return None if v is None else str(v)
    return None


def write_cri(log: Any, stream: bytes, chunk: bytes) -> None:
    """Append output in the CRI log format; an unterminated tail becomes a partial ('P') entry."""
    ts = rfc3339nano().encode()
    lines = chunk.split(b"\n")
    out = []
    for line in lines[:-1]:
        out.append(b"%s %s F %s\n" % (ts, stream, line))
    if lines[-1]:
        out.append(b"%s %s P %s\n" % (ts, stream, lines[-1]))
    log.write(b"".join(out))


def parse_cri(data: bytes) -> tuple[list[tuple[str, bytes, bytes]], int]:
    """Complete entries in data as (timestamp, stream, content-as-served) and the bytes consumed."""
    entries: list[tuple[str, bytes, bytes]] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return entries, pos
        line = data[pos:nl]
        pos = nl + 1
        parts = line.split(b" ", 3)
        if len(parts) < 4:
            continue
        ts, stream, tag, content = parts
        entries.append((ts.decode(), stream, content + (b"\n" if tag == b"F" else b"")))


def tail_entries(entries: list[tuple[str, bytes, bytes]], n: int) -> list[tuple[str, bytes, bytes]]:
    """The entries that make up the last n lines (partial fragments belong to the line they end in)."""
    if n == 0:
        return []
    lines = 0
    i = len(entries)
    # A trailing partial line counts as a line of its own, as the kubelet counts it.
    if entries and not entries[-1][2].endswith(b"\n"):
        lines = 1
        i -= 1
        while i > 0 and not entries[i - 1][2].endswith(b"\n"):
            i -= 1
    while i > 0 and lines < n:
        i -= 1
        lines += 1
        while i > 0 and not entries[i - 1][2].endswith(b"\n"):
            i -= 1
    return entries[i:]


def parse_resize(payload: bytes) -> list[tuple[int, int]]:
    """Channel-4 payload: one or more JSON TerminalSize objects {"Width": w, "Height": h}."""
    out = []
    dec = json.JSONDecoder()
    text = payload.decode(errors="replace").strip()
    while text:
        try:
            obj, end = dec.raw_decode(text)
        except ValueError:
            break
        text = text[end:].lstrip()
        if isinstance(obj, dict):
            out.append((int(obj.get("Width") or 0), int(obj.get("Height") or 0)))
    return out


def configured_isolation() -> str | None:
    """How a PodRuntime() made now confines its pods (KUBEGATE_SANDBOX_ISOLATION); None: they fail closed."""
    return choose_isolation(os.environ.get("KUBEGATE_SANDBOX_ISOLATION", "auto"))[0]


def choose_isolation(wanted: str = "auto") -> tuple[str | None, str | None]:
    """(how pods are confined: "namespaces", "proot" or None when nothing works here, the proot binary).

    wanted: auto (the first that works, namespaces first: read-only image), namespaces or proot;
    KUBEGATE_SANDBOX_PROOT=0 never uses proot. Anything else confines nothing (pods fail closed).
    """
    wanted = wanted.strip().lower() or "auto"
    proot = shutil.which("proot") if os.environ.get("KUBEGATE_SANDBOX_PROOT", "1") != "0" else None
    candidates = ISOLATIONS if wanted == "auto" else tuple(i for i in ISOLATIONS if i == wanted)
    for isolation in candidates:
        if isolation == "namespaces" and namespaces_work():
            return "namespaces", None
        if isolation == "proot" and proot:
            return "proot", proot
    return None, None


def namespaces_work() -> bool:
    """Whether confine.py can enter a mount namespace here (tried once in a child process)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", str(CONFINE_SCRIPT), "--probe"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def resolve_in_root(root: Path, guest: str, cwd: str = "/", *, max_links: int = 40) -> str:
    """The host path of `guest` as the kernel resolves it after chroot(root): relative to cwd, `..` stops
    at the pod's "/", symlinks are read inside the pod (an absolute target starts again at the pod's "/"),
    and the image directories (PROGRAM_DIRS, SYSTEM_DIRS) are the host's. Never a path outside root or the
    image, whatever links the pod made."""
    pending = [p for p in posixpath.join("/", cwd, guest).split("/") if p]
    resolved: list[str] = []
    links = 0

    def host_of(parts: list[str]) -> str:
        path = "/" + "/".join(parts)
        for image_dir in IMAGE_DIRS:
            if path == image_dir or path.startswith(image_dir + "/"):
                return path
        return str(root.joinpath(*parts)) if parts else str(root)

    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = [*resolved, part]
        host = host_of(candidate)
        if os.path.islink(host):
            links += 1
            if links > max_links:
                return UNRESOLVABLE  # ELOOP in the pod; never a path the host would follow for us
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved = candidate
    return host_of(resolved)
