"""A private PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temporary folder, on a
free loopback port, trust authentication. Run as the `postgres` user when the tests run as root
(PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Postgres:
    url: str  # SQLAlchemy URL (psycopg 3)
    port: int
    data: Path
    bin: Path
    runas: list[str]
    options: str = ""

    def start(self) -> None:
        """Start it again after `stop` (same data, same port)."""
        subprocess.run([*self.runas, str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", self.options, "-l",
                        str(self.data.parent / "log"), "-w", "start"], check=True, capture_output=True, timeout=120)  # fmt: skip

    def stop(self) -> None:
        subprocess.run([*self.runas, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip

    def create_database(self, name: str) -> str:
        subprocess.run([*self.runas, str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                        "postgres", name], check=True, capture_output=True, timeout=60)  # fmt: skip
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def start_postgres(directory: Path, port: int) -> Postgres:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries are not installed (Debian package postgresql; .ci/run installs it)"
        )
    runas: list[str] = []
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        runas = ["runuser", "-u", "postgres", "--"]
    data = directory / "data"
    subprocess.run([*runas, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*runas, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"),
                    "-w", "start"], check=True, capture_output=True, timeout=120)  # fmt: skip
    server = Postgres(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", port, data, bin_dir, runas, options
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        )
        if ready.returncode == 0:
            return server
        time.sleep(0.2)
    raise RuntimeError((directory / "log").read_text())
