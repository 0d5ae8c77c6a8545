"""Services of a test's or a benchmark's own: a redis-server and a PostgreSQL server on free ports.

They run from temporary directories, so a test may restart, stop or kill them without touching
the machine's shared Redis or PostgreSQL (tests/production/harness.py, ops/bench/soak.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psycopg
import redis
from sqlalchemy.engine import make_url

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_up(port: int, host: str = "127.0.0.1") -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) as the plain URL psycopg connects with."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_up(url: str) -> bool:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def postgres_bin(tool: str) -> str:
    """A PostgreSQL server binary (initdb, pg_ctl, postgres): on PATH, else Debian's newest."""
    found = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{tool} not found: install the PostgreSQL server package")
    return found


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of this test's own (initdb in a temp dir, a free port, trust auth),
    so a test may stop and restart it without touching anyone else's server.

    PostgreSQL refuses to run as root: as root, its files belong to the ``postgres`` user and its
    commands run through ``runuser``.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    home: Path | None = None

    @property
    def datadir(self) -> Path:
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="kaizen-pg-"))  # not under a 0700 pytest dir: postgres must reach it
            if os.geteuid() == 0:
                shutil.chown(self.home, "postgres", "postgres")
        return self.home / "pgdata"

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], **kwargs)  # type: ignore[call-overload]

    def cleanup(self) -> None:
        self.stop("immediate")
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._run(
            [postgres_bin("initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )

    def start(self) -> None:
        if not self.datadir.exists():
            self.init()
        # The Unix socket goes to /tmp: a socket path under a deep pytest tmp dir can exceed the 107-byte limit.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {tempfile.gettempdir()} -c fsync=off"
        self._run(
            [postgres_bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.datadir.parent / "postgres.log"), "-o", options, "-w", "start"],
            check=True, stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: postgres_up(self.url), 60, "the private PostgreSQL server")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run([postgres_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"], check=False, stdout=subprocess.DEVNULL)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class PrivateRedis:
    """A redis-server of the tests' own, without persistence: a restart loses every message."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, number: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{number}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        wait_for(lambda: redis_up(self.port), 30, "the private redis-server")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self, number: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=number)
