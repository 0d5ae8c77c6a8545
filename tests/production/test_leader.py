"""Leader election between daemons: PostgreSQL advisory lock and SQLite lock file, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from daemon.config import load_settings
from daemon.db.engine import make_engine
from daemon.db.models import Iteration
from daemon.dispatch import EagerDispatcher
from daemon.leader import LeaderElection, LeaderElectionError, leader_lock_for
from daemon.scheduler import Daemon
from tests.production.harness import REPO

HOLD_LOCK = """
import sys, time
from daemon.leader import LeaderElection, leader_lock_for
election = LeaderElection(leader_lock_for(sys.argv[1]), poll_seconds=0.1)
election.wait_until_leader()
print("LEADER", flush=True)
time.sleep(600)
"""


def _lock_holder_process(database_url: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, database_url], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )
    assert process.stdout is not None
    for line in process.stdout:  # structlog lines come first
        if line.strip() == "LEADER":
            return process
    raise AssertionError(f"the lock holder exited with {process.wait()} before leading")


def _standby_takes_over_when_the_leader_is_killed(database_url: str) -> None:
    leader = _lock_holder_process(database_url)
    standby = LeaderElection(leader_lock_for(database_url), poll_seconds=0.1)
    stop = threading.Event()
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(standby.wait_until_leader(stop)))
    try:
        waiter.start()
        waiter.join(timeout=1.5)
        assert waiter.is_alive() and not standby.leading, "the standby must wait while the leader lives"

        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)

        waiter.join(timeout=20)
        assert outcome == [True] and standby.still_leader()
    finally:
        stop.set()
        standby.resign()
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)


@pytest.mark.slow
def test_postgres_standby_takes_over_when_the_leader_process_is_killed(pg_url: str) -> None:
    _standby_takes_over_when_the_leader_is_killed(pg_url)


@pytest.mark.slow
def test_sqlite_standby_takes_over_when_the_leader_process_is_killed(tmp_path: Path) -> None:
    _standby_takes_over_when_the_leader_is_killed(f"sqlite:///{tmp_path / 'lineage.db'}")


def _kill_lock_sessions(pg_url: str) -> None:
    # An operator's pg_terminate_backend, a network cut, a server restart: the session and its lock are gone.
    with make_engine(pg_url).connect() as conn:
        killed = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'kaizen-leader%'"
        )).scalar()
    assert killed == 1


def test_a_leader_that_lost_its_lock_connection_takes_the_lock_again_if_nobody_else_did(pg_url: str) -> None:
    election = LeaderElection(leader_lock_for(pg_url), poll_seconds=0.1)
    assert election.wait_until_leader()
    _kill_lock_sessions(pg_url)
    assert election.still_leader() is True  # re-acquired on a new session
    other = LeaderElection(leader_lock_for(pg_url), poll_seconds=0.1)
    assert other.lock.try_acquire() is False  # and really held again
    other.resign()
    election.resign()


def test_a_leader_whose_lock_another_daemon_took_stops_before_starting_a_cycle(tmp_path: Path, tiny_model_dir: Path, pg_url: str, pg_sessions) -> None:  # type: ignore[no-untyped-def]
    from daemon.bootstrap import initialise

    settings = load_settings(None, data_dir=tmp_path / "data", database_url=pg_url, model={"path": str(tiny_model_dir)},
                             worker={"mode": "eager"})
    election = LeaderElection(leader_lock_for(pg_url), poll_seconds=0.1)
    assert election.wait_until_leader()
    sessions = initialise(settings)
    _kill_lock_sessions(pg_url)
    other = LeaderElection(leader_lock_for(pg_url), poll_seconds=0.1)
    assert other.wait_until_leader(), "the lock is free for the next leader"
    daemon = Daemon(settings, sessions, EagerDispatcher(settings, sessions), max_cycles=1, leader=election)

    daemon._tick()

    assert daemon.gave_up is not None and "another daemon took the leader lock" in daemon.gave_up
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Iteration)) == 0
    other.resign()
    election.resign()


def test_an_unsupported_database_is_refused_with_a_clear_message() -> None:
    with pytest.raises(LeaderElectionError, match="PostgreSQL and SQLite"):
        leader_lock_for("mysql+pymysql://kaizen@db/kaizen")


def test_the_postgres_lock_session_has_server_side_keepalives(pg_url: str) -> None:
    # Without them a leader whose machine vanished would hold the lock until the OS gives up (hours).
    lock = leader_lock_for(pg_url)
    assert lock.try_acquire()
    try:
        settings = dict(lock.connection.execute(text(  # type: ignore[attr-defined]
            "SELECT name, setting FROM pg_settings WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count')"
        )).all())
    finally:
        lock.release()
    assert settings == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


def test_a_lineage_db_that_stays_unreachable_fails_with_the_reason() -> None:
    # Nothing listens on port 1: a wrong database_url must not look like a standby waiting forever.
    election = LeaderElection(leader_lock_for("postgresql+psycopg://kaizen@127.0.0.1:1/kaizen"), poll_seconds=0.1,
                              unreachable_limit_seconds=0.5)
    with pytest.raises(LeaderElectionError, match=r"(?s)unreachable for 0.5s .*Connection refused.*check database_url"):
        election.wait_until_leader()
