"""Run a command confined to a pod's root directory, without proot: Linux namespaces and chroot.

Usage (what the pod runtime runs; stdlib only, so it starts with ``python -I -S``)::

    python -I -S confine.py ROOT WORKDIR -- COMMAND [ARG...]

The process enters new user, mount and PID namespaces, bind-mounts the host's program directories
(``/usr``, ``/bin``, ``/sbin``, ``/lib*``, ``/etc/alternatives``) read-only into ROOT, gives it a fresh
read-only ``/proc`` (only the pod's own processes: no ``/proc/1/root`` back to the host) and a ``/dev`` of
a few harmless nodes (null, zero, full, random, urandom, tty), then chroots to ROOT and runs COMMAND in
WORKDIR. Every path the command uses, absolute or with ``..`` or through a symlink, is resolved by the
kernel inside ROOT: the host's ``/etc``, ``/home``, ``/tmp`` and the other pods are out of reach, and the
program directories cannot be written. The user namespace maps the pod's root to the user running the
sandbox, or to ``nobody`` (65534) when that is the host's root, so a pod has no capability on the host.

Processes: this one (the pid the runtime waits for; exits with the command's status) -> the namespace's
init (pid 1: mounts, chroots, reaps) -> the command (pid 2). When pid 1 exits, the kernel ends whatever the
command left running, as when a container stops.

On failure it prints one line ``confine: ...`` to stderr and exits 126 before running anything (fail closed:
the command never runs unconfined). ``--probe`` checks that confinement works here (exit 0).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import termios
import warnings  # noqa: F401  (os.execvp imports it lazily: after the chroot it could not)

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
# Host directories a pod sees read-only (its "image"); symlinks among them (merged /usr) are copied as links.
# /etc/alternatives holds only links (Debian's awk, vi, ...); the rest of /etc is the pod's own.
PROGRAM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives")
# What proot binds besides the programs (proot answers /proc/PID/root itself); confine mounts its own.
SYSTEM_DIRS = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/proc")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
NOBODY = 65534
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
PR_SET_DUMPABLE = 4
EXIT_CONFINE_FAILED = 126

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), None, flags, None), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kept_flags(path: str) -> int:
    """The flags of the mount under path that a remount must repeat (in a user namespace they are locked)."""
    have = os.statvfs(path).f_flag
    pairs = ((os.ST_NODEV, 0x4), (os.ST_NOEXEC, 0x8), (os.ST_NOATIME, 0x400), (os.ST_NODIRATIME, 0x800))
    kept = 0
    for st_flag, ms_flag in pairs:
        if have & st_flag:
            kept |= ms_flag
    if have & os.ST_RELATIME:
        kept |= 0x200000
    return kept


def enter_namespace() -> None:
    """New user, mount and PID namespaces (the PID one takes effect for our children)."""
    if os.getuid() == 0:
        # The host's root first becomes nobody for good: root inside the pod, no capability outside it.
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        # Changing uid made us non-dumpable, which hands /proc/self to root: take it back to write our maps.
        _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _mount(None, "/", MS_REC | MS_PRIVATE)  # nothing we mount shows up on the host


def _own_dir(root: str, guest_dir: str) -> str:
    """root/guest_dir as a real directory, every component of it inside root.

    The pod may have put links or files where the image's directories go; they are replaced, never
    followed (a link to a host directory must not make us create, remove or mount anything there).
    """
    path = root
    for part in guest_dir.strip("/").split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        if not os.path.lexists(path):
            os.mkdir(path)
    return path


def populate(root: str) -> None:
    """Bind the host's program and system directories into root (programs read-only)."""
    for host_dir in PROGRAM_DIRS:
        if not os.path.exists(host_dir):
            continue
        parent = _own_dir(root, os.path.dirname(host_dir)) if os.path.dirname(host_dir) != "/" else root
        target = os.path.join(parent, os.path.basename(host_dir))
        if os.path.islink(host_dir):
            # Merged /usr: /bin -> usr/bin. The pod gets the same link (replacing whatever it put there).
            if os.path.lexists(target) and not (
                os.path.islink(target) and os.readlink(target) == os.readlink(host_dir)
            ):
                if os.path.isdir(target) and not os.path.islink(target):
                    continue  # a directory of the pod's own: left alone (programs are found via /usr)
                os.unlink(target)
            if not os.path.lexists(target):
                os.symlink(os.readlink(host_dir), target)
            continue
        target = _own_dir(root, host_dir)
        _mount(host_dir, target, MS_BIND | MS_REC)
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | _kept_flags(host_dir))
    dev = _own_dir(root, "/dev")
    for node in DEV_NODES:
        _bind_node(f"/dev/{node}", os.path.join(dev, node))
    if os.isatty(0) and os.ttyname(0).startswith("/dev/pts/"):
        # The pod's own terminal (and no other of the host's) at its usual name: `tty`, ttyname() work.
        terminal = os.ttyname(0)
        _bind_node(terminal, os.path.join(_own_dir(root, "/dev/pts"), os.path.basename(terminal)))
    for name, link in DEV_LINKS.items():
        target = os.path.join(dev, name)
        if os.path.lexists(target):
            _remove(target)
        os.symlink(link, target)
    proc = _own_dir(root, "/proc")
    try:
        _check(
            _libc.mount(b"proc", proc.encode(), b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
            "mount /proc",
        )
    except OSError:
        pass  # some container runtimes forbid a new procfs: the pod goes without /proc (never the host's)


def _bind_node(device: str, target: str) -> None:
    """Bind one host device node at target (a plain file of the pod's, never a link it could aim)."""
    if os.path.islink(target) or os.path.isdir(target):
        _remove(target)
    if not os.path.lexists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o666))
    _mount(device, target, MS_BIND)


def _remove(path: str) -> None:
    """Remove a file, link or tree without following links (os only: after dropping root, other modules
    of the standard library may not be readable)."""
    if os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(top, name))
            for name in dirs:
                sub = os.path.join(top, name)
                os.unlink(sub) if os.path.islink(sub) else os.rmdir(sub)
        os.rmdir(path)
    else:
        os.unlink(path)


def _ignore(signum: int, frame: object) -> None:
    """^C on the pod's terminal reaches this process group too: only the command may act on it."""


def _forward_to(pid: int) -> None:
    """SIGTERM and SIGHUP (the runtime stopping the pod) go on to the command, which decides what to do."""

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _init(root: str, workdir: str, command: list[str]) -> int:
    """pid 1 of the pod's namespace (cwd: the pod's root): mount, chroot, start the command, reap."""
    try:
        populate(".")
        os.chroot(".")
        os.chdir("/")
        os.makedirs(workdir, exist_ok=True)  # inside the chroot now: cannot land outside root
        os.chdir(workdir)
    except OSError as exc:
        print(f"confine: cannot confine the pod to {root}: {exc}", file=sys.stderr)
        return EXIT_CONFINE_FAILED
    child = os.fork()
    if child == 0:
        for signum in (*FORWARDED, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        try:
            if os.isatty(0):
                # The terminal's session and foreground group are the command's, inside the namespace
                # (a shell restoring a foreground group from outside it would fail and exit 2).
                os.setsid()
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"confine: exec {command[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(127 if isinstance(exc, FileNotFoundError) else EXIT_CONFINE_FAILED)
    _forward_to(child)
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return EXIT_CONFINE_FAILED
        if pid == child:
            return _status(wait_status)


def main(argv: list[str]) -> int:
    probe = argv[:1] == ["--probe"]
    if not probe and (len(argv) < 4 or argv[2] != "--"):
        print("confine: usage: confine.py ROOT WORKDIR -- COMMAND [ARG...]", file=sys.stderr)
        return EXIT_CONFINE_FAILED
    root, workdir, command = (
        (os.path.realpath(argv[0]), argv[1] or "/", argv[3:]) if not probe else ("", "/", [])
    )
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGQUIT, _ignore)
    try:
        if not probe:
            # cwd, not the path: nobody may not traverse the path's parents, and unshare moves cwd (not an
            # open fd) into the new mount namespace, where the mounts must be made.
            os.chdir(root)
        enter_namespace()
    except OSError as exc:
        print(f"confine: cannot confine the pod: {exc}", file=sys.stderr)
        return EXIT_CONFINE_FAILED
    scratch = ""
    if probe:
        scratch = f"/tmp/kubegate-confine-probe-{os.getpid()}"
        os.makedirs(scratch, exist_ok=True)
    init = os.fork()
    if init != 0:
        _forward_to(init)
    if init == 0:
        if probe:
            # The whole setup on a scratch root: binds, read-only remounts, /dev nodes, chroot.
            try:
                # A mount namespace of the probe's own: its mounts end with it, before scratch is removed.
                _check(_libc.unshare(CLONE_NEWNS), "unshare")
                populate(scratch)
                os.chroot(scratch)
            except OSError as exc:
                print(f"confine: cannot confine pods here: {exc}", file=sys.stderr)
                os._exit(EXIT_CONFINE_FAILED)
            os._exit(0)
        os._exit(_init(root, workdir, command))
    _, wait_status = os.waitpid(init, 0)
    if probe:
        try:
            _remove(scratch)
        except OSError:
            pass
    return _status(wait_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
