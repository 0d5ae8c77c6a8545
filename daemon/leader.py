"""Leader election: of the daemons started against one lineage DB, exactly one runs cycles.

The others wait as standby and take over when the leader dies. The lock lives in the lineage
DB's own infrastructure, so there is nothing else to run and nothing to expire by hand:

* **PostgreSQL**: a session-level ``pg_try_advisory_lock`` on a dedicated connection. The
  server releases it when that session ends, which happens when the leader process dies (its
  socket closes) or, if its machine vanishes, when the server's TCP keepalive probes for that
  session (set on connect: 10 s idle, 3 probes 5 s apart) give up on it — after about 25 s. Advisory locks are per database, so lineages in different
  databases of one server do not contend.
* **SQLite**: an exclusive ``flock`` on ``<db>.leader.lock`` next to the DB file. The kernel
  releases it when the process dies. SQLite lineages are single-host, and so is the lock.

Leadership is checked again before every cycle: a leader whose lock connection broke stops
(and its supervisor restarts it as a standby) instead of racing the new leader. Should two
daemons ever both act — the old leader in the middle of a cycle when its connection dropped —
the DB still keeps the effects single: a new iteration is only started under the champion row
lock after checking for a running one (daemon/cycle.py), and each stage is a lease with a fenced
commit (daemon/stage_runner.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from daemon.config import Settings

log = structlog.get_logger(__name__)

LOCK_NAME = "kaizen.daemon.leader"
# pg advisory locks take a bigint key; derive a stable one from the name.
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)


class LeaderElectionError(RuntimeError):
    """Leader election cannot work for this lineage DB."""


class LeaderLock(Protocol):
    def try_acquire(self) -> bool: ...

    def still_held(self) -> bool: ...

    def holder(self) -> str | None: ...

    def release(self) -> None: ...


def _identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class PostgresAdvisoryLock:
    """A session-level advisory lock on a connection of its own (never returned to a pool)."""

    def __init__(self, url: str, key: int = ADVISORY_LOCK_KEY) -> None:
        self.key = key
        self.engine: Engine = create_engine(
            url,
            poolclass=NullPool,
            connect_args={
                # The application name tells a standby who the leader is (pg_stat_activity).
                "application_name": f"kaizen-leader {_identity()}"[:63],
                # The server must notice a leader whose machine vanished: without keepalive
                # probes from its side it keeps the session, and the lock, until the OS gives up
                # on the socket (hours). These server settings apply to this session only.
                "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
                # And the leader must notice a dead server or network: the same from its side.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "connect_timeout": 10,
            },
        )
        self.connection: Connection | None = None

    def _connect(self) -> Connection:
        if self.connection is None or self.connection.closed or self.connection.invalidated:
            self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.connection

    def try_acquire(self) -> bool:
        try:
            acquired = bool(self._connect().execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
        except Exception:
            self._drop_connection()
            raise
        return acquired

    def still_held(self) -> bool:
        if self.connection is None:
            return False
        try:
            count = self.connection.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                    "AND granted AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": self.key},
            ).scalar()
        except Exception as exc:  # the session is gone, and with it the lock
            log.error("leader.connection_lost", error=str(exc))
            self._drop_connection()
            return False
        return bool(count)

    def holder(self) -> str | None:
        try:
            return self._connect().execute(
                text(
                    "SELECT a.application_name || ' (backend pid ' || a.pid || coalesce(', ' || host(a.client_addr), '') || ')' "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = :key"
                ),
                {"key": self.key},
            ).scalar()
        except Exception:
            self._drop_connection()
            return None

    def release(self) -> None:
        if self.connection is not None and not self.connection.closed:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            except Exception as exc:
                log.warning("leader.unlock_failed", error=str(exc))
        self._drop_connection()
        self.engine.dispose()

    def _drop_connection(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:
                pass
        self.connection = None


class FileLock:
    """An exclusive flock on a file; the holder writes its identity into it for standbys to read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        if self.fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, _identity().encode())
        os.fsync(fd)
        self.fd = fd
        return True

    def still_held(self) -> bool:
        return self.fd is not None

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class ProcessLock:
    """An in-memory SQLite lineage lives in one process: there is nobody to elect against."""

    def __init__(self) -> None:
        self.held = False

    def try_acquire(self) -> bool:
        self.held = True
        return True

    def still_held(self) -> bool:
        return self.held

    def holder(self) -> str | None:
        return _identity() if self.held else None

    def release(self) -> None:
        self.held = False


def leader_lock_for(database_url: str) -> LeaderLock:
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        return PostgresAdvisoryLock(database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return ProcessLock()
        return FileLock(Path(url.database).expanduser().resolve().with_name(Path(url.database).name + ".leader.lock"))
    raise LeaderElectionError(
        f"leader election supports PostgreSQL and SQLite lineage DBs, not {url.get_backend_name()!r}; "
        "set database_url to postgresql+psycopg://... (several hosts) or sqlite:///... (one host)"
    )


class LeaderElection:
    """Blocks as standby until this process holds the leader lock; then says whether it still does."""

    def __init__(self, lock: LeaderLock, poll_seconds: float = 5.0, unreachable_limit_seconds: float = 60.0) -> None:
        self.lock = lock
        self.poll_seconds = poll_seconds
        # The DB may still be starting: keep trying this long, then fail with the reason (a wrong
        # database_url should not look like a standby waiting forever).
        self.unreachable_limit_seconds = unreachable_limit_seconds
        self.leading = False

    def wait_until_leader(self, stop: threading.Event | None = None) -> bool:
        """Return True once leader, False if ``stop`` was set first; LeaderElectionError if the
        lock stayed unreachable for ``unreachable_limit_seconds``."""
        stop = stop or threading.Event()
        announced = False
        unreachable_since: float | None = None
        while not stop.is_set():
            try:
                if self.lock.try_acquire():
                    self.leading = True
                    log.info("leader.acquired", identity=_identity(), took_over=announced)
                    return True
            except Exception as exc:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since >= self.unreachable_limit_seconds:
                    raise LeaderElectionError(
                        f"cannot take the leader lock: the lineage DB has been unreachable for "
                        f"{self.unreachable_limit_seconds:g}s ({exc}); check database_url"
                    ) from exc
                log.warning("leader.lock_unavailable", error=str(exc), retry_in=self.poll_seconds)
            else:
                unreachable_since = None
                if not announced:
                    log.info("leader.standby", leader=self.lock.holder(), poll_seconds=self.poll_seconds)
                    announced = True
            stop.wait(self.poll_seconds)
        return False

    def still_leader(self) -> bool | None:
        """True while this process leads. A lock lost with its connection (a DB restart) is taken
        again if nobody else took it meanwhile. False: another daemon holds it now (stop). None:
        the DB cannot be asked right now (try again later)."""
        if not self.leading:
            return False
        if self.lock.still_held():
            return True
        try:
            reacquired = self.lock.try_acquire()
        except Exception as exc:  # the DB is still away: neither leading for sure nor replaced
            log.warning("leader.lock_unreachable", error=str(exc).splitlines()[0])
            return None
        if reacquired:
            log.info("leader.reacquired", identity=_identity())
            return True
        self.leading = False
        log.error("leader.lost", identity=_identity(), leader=self.lock.holder())
        return False

    def resign(self) -> None:
        if self.leading:
            log.info("leader.resigned", identity=_identity())
        self.leading = False
        self.lock.release()


@contextmanager
def leadership(settings: Settings, stop: threading.Event | None = None) -> Iterator[LeaderElection | None]:
    """Hold the leader lock of ``settings``' lineage DB for the duration of the block.

    Yields the election once this process leads (after waiting as standby if another daemon
    does), or None if ``stop`` was set while waiting.
    """
    election = LeaderElection(leader_lock_for(settings.resolved_database_url), settings.schedule.standby_poll_seconds)
    try:
        yield election if election.wait_until_leader(stop) else None
    finally:
        election.resign()
