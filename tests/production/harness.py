"""Real services and real processes for the production-mode tests.

The tests never touch a service they did not create:

* **Redis.** ``KAIZEN_TEST_REDIS_URL`` names a Redis DB set aside for tests; each test deletes
  only the keys that appeared during it. Unset (the default), the test session starts its own
  ``redis-server`` on a free port (no persistence, killed at the end) and each test gets a DB
  number of that server, flushed before and after: it is nobody else's.
* **PostgreSQL.** ``KAIZEN_TEST_DATABASE_URL`` names a server (any database on it, e.g.
  ``postgresql://postgres@db:5432/postgres``) where each test creates a database of a random
  name and drops it afterwards. Unset, the machine's server at 127.0.0.1:5432 (trust auth) is
  used the same way; it is started with the commands CI uses if it is down. Nothing else on the
  server is dropped. :class:`PrivatePostgres` is a server of a test's own (initdb in its tmp dir)
  for tests that restart or stop PostgreSQL.

Daemons and workers are the real `kaizen run` / `kaizen worker` commands, each started in a
process group of its own so a test can ``kill -9`` exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
import yaml
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from daemon.db import lineage
from daemon.db.models import (
    Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt, Response, StageRun,
    StageStatus,
)
# Re-exported: the production tests take every service helper from here.
from ops.services import PrivatePostgres, PrivateRedis, free_port, libpq_url, postgres_up, redis_up, wait_for  # noqa: F401
from tests.factories import small_cycle_config
from daemon.stage_specs import CORE_STAGES

REPO = Path(__file__).resolve().parents[2]
TEST_REDIS_ENV = "KAIZEN_TEST_REDIS_URL"
TEST_DATABASE_ENV = "KAIZEN_TEST_DATABASE_URL"
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DB_COUNT = 16  # redis-server's default `databases`


# --------------------------------------------------------------------------- PostgreSQL


def _database_url(server_url: str, name: str) -> str:
    """The SQLAlchemy URL of database ``name`` on the server of ``server_url``."""
    return make_url(server_url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def postgres_server_for_tests() -> str:
    """The server tests create their databases on: KAIZEN_TEST_DATABASE_URL, or the machine's own."""
    configured = os.environ.get(TEST_DATABASE_ENV)
    if configured:
        if not postgres_up(configured):
            raise RuntimeError(f"{TEST_DATABASE_ENV}={make_url(configured)!r} does not accept connections")
        return configured
    ensure_local_postgres()
    return DEFAULT_TEST_DATABASE_URL


def ensure_local_postgres() -> None:
    if postgres_up(DEFAULT_TEST_DATABASE_URL):
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
    wait_for(lambda: postgres_up(DEFAULT_TEST_DATABASE_URL), 60, "PostgreSQL to accept connections")


@contextlib.contextmanager
def scratch_database(server_url: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (created here, dropped afterwards); its SQLAlchemy URL."""
    server_url = server_url or postgres_server_for_tests()
    name = f"kaizen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(server_url, name)
    finally:
        with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- Redis


class RedisForTests:
    """Where the tests' brokers live: the Redis DB of KAIZEN_TEST_REDIS_URL, or DBs of a private server."""

    def __init__(self, workdir: Path) -> None:
        self.external = os.environ.get(TEST_REDIS_ENV)
        self.private: PrivateRedis | None = None
        self._next_db = 0
        if self.external is None:
            self.private = PrivateRedis(workdir)
            self.private.start()

    @contextlib.contextmanager
    def scratch_db(self) -> Iterator[str]:
        """A broker URL for one test; whatever the test leaves there is removed, and nothing else."""
        if self.private is not None:
            number = self._next_db % REDIS_DB_COUNT
            self._next_db += 1
            db = self.private.client(number)
            db.flushdb()  # our own server: a killed earlier test may have left messages
            try:
                yield self.private.db_url(number)
            finally:
                with contextlib.suppress(redis.RedisError):
                    db.flushdb()
            return
        assert self.external is not None
        db = redis.Redis.from_url(self.external)
        before = set(db.scan_iter(count=1000))
        try:
            yield self.external
        finally:
            created = [key for key in db.scan_iter(count=1000) if key not in before]
            if created:
                db.delete(*created)

    def close(self) -> None:
        if self.private is not None:
            self.private.kill()


# --------------------------------------------------------------------------- processes


@dataclass
class KaizenProcess:
    """A `kaizen ...` command in a process group of its own, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The structlog JSON lines this process wrote."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def has_event(self, event: str, **fields: Any) -> bool:
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events())

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        """Pids of this process's direct children (the Celery pool processes of a worker)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill9(self) -> None:
        """SIGKILL the whole process group: the process and everything it forked, nothing else."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
        else:
            with contextlib.suppress(ProcessLookupError):  # orphaned pool processes of a killed worker
                os.killpg(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)


def spawn(name: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> KaizenProcess:
    return spawn_python(name, ["-m", "daemon.cli", *args], cwd, env)


def spawn_python(name: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> KaizenProcess:
    """``python ARGS`` in a process group of its own, without the test's KAIZEN_* variables."""
    log_path = cwd / f"{name}.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    base_env["PYTHONPATH"] = str(REPO)
    popen = subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env={**base_env, **(env or {})},
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )
    return KaizenProcess(name, popen, log_path)


def spawn_worker(config: Path, name: str = "worker", concurrency: int = 1) -> KaizenProcess:
    return spawn(name, ["worker", "--config", str(config), "--queues", "gpu,cpu", "--concurrency", str(concurrency)], config.parent)


def spawn_daemon(config: Path, name: str = "daemon", cycles: int = 1) -> KaizenProcess:
    return spawn(name, ["run", "--config", str(config), "--cycles", str(cycles)], config.parent)


class Processes:
    """Stops every process a test started, whatever the test's outcome."""

    def __init__(self) -> None:
        self.started: list[KaizenProcess] = []

    def add(self, process: KaizenProcess) -> KaizenProcess:
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} (pid {p.pid}) -----\n{p.log()[-6000:]}" for p in self.started)


# --------------------------------------------------------------------------- config


def production_config(tmp_path: Path, model_dir: Path, database_url: str, broker_url: str, **overrides: Any) -> Path:
    """A kaizen.yaml for external workers over ``broker_url`` and lineage at ``database_url``.

    Timings are short so faults are noticed in seconds: a 4 s lease, re-dispatch after 2 s.
    """
    worker = {
        "mode": "external", "broker_url": broker_url, "lease_seconds": 4, "redispatch_seconds": 2,
        "stage_timeout_seconds": 240, "publish_retry_seconds": 30,
    } | overrides.pop("worker", {})
    schedule = {"interval_seconds": 1, "max_consecutive_failures": 3, "standby_poll_seconds": 0.5} | overrides.pop("schedule", {})
    config = small_cycle_config(
        tmp_path / "data", model_dir, log_format="json", database_url=database_url, worker=worker, schedule=schedule, **overrides
    )
    path = tmp_path / "kaizen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------- lineage checks


def lineage_queue_of(sessions: sessionmaker[Session], queue: str) -> str | None:
    """The broker queue of logical ``queue`` (gpu, cpu) of this lineage; None before it is migrated."""
    from workers.lineage_queues import lineage_queue

    with sessions() as session, _before_migration_is_none():
        found = lineage.lineage_uuid(session)
        return lineage_queue(found, queue) if found else None
    return None


def lineage_id_of(sessions: sessionmaker[Session]) -> str:
    with sessions() as session:
        found = lineage.lineage_uuid(session)
    assert found is not None, "the lineage DB is not migrated"
    return found


def stage_row(sessions: sessionmaker[Session], iteration_id: int, stage: str) -> StageRun | None:
    with sessions() as session:
        return session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == stage)).one_or_none()


def stage_running(sessions: sessionmaker[Session], stage: str) -> StageRun | None:
    """The row of ``stage`` once a worker holds it (status running, lease set)."""
    with sessions() as session, _before_migration_is_none():
        return session.scalars(
            select(StageRun).where(StageRun.stage == stage, StageRun.status == StageStatus.running, StageRun.worker_id.is_not(None))
        ).first()
    return None


def succeeded_stages(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session, _before_migration_is_none():
        return set(session.scalars(select(StageRun.stage).where(StageRun.status == StageStatus.succeeded)))
    return set()


@contextlib.contextmanager
def _before_migration_is_none() -> Iterator[None]:
    # A test polls the lineage DB from the moment it starts the daemon, which creates the tables.
    try:
        yield
    except ProgrammingError as exc:
        if "does not exist" not in str(exc):
            raise


def _count(session: Session, model: Any, *where: Any) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def assert_lineage_exact(sessions: sessionmaker[Session], settings_dict: dict[str, Any], data_dir: Path, iterations: int) -> None:
    """Nothing lost, nothing duplicated: every iteration completed with exactly one of everything."""
    per_cycle = settings_dict["prompts"]["per_cycle"]
    heldout = settings_dict["gate"]["heldout_prompts"]
    samples = settings_dict["respond"]["num_samples"]
    judge_samples = settings_dict["judge"]["num_samples"]
    with sessions() as session:
        rows = list(session.scalars(select(Iteration).order_by(Iteration.id)))
        assert [it.status for it in rows] == [IterationStatus.completed] * iterations, [(it.id, it.status, it.error) for it in rows]
        for it in rows:
            stages = list(session.scalars(select(StageRun).where(StageRun.iteration_id == it.id)))
            assert sorted(s.stage for s in stages) == sorted(CORE_STAGES)
            assert all(s.status == StageStatus.succeeded and s.input_hash and len(s.input_hash) == 64 for s in stages)
            assert _count(session, Prompt, Prompt.iteration_id == it.id) == per_cycle + heldout
            policy = _count(session, Response, Response.iteration_id == it.id, Response.kind == "policy")
            assert policy == per_cycle * samples
            assert _count(session, Response, Response.iteration_id == it.id) == per_cycle * (samples + 2)
            assert _count(session, Judgment, Judgment.iteration_id == it.id) == policy * judge_samples
            pairs_result = next(s.result for s in stages if s.stage == "build_pairs")
            assert _count(session, Pair, Pair.iteration_id == it.id) == pairs_result["pairs"]
            assert _count(session, Evaluation, Evaluation.iteration_id == it.id) == 1
            candidates = list(session.scalars(select(Checkpoint).where(Checkpoint.created_iteration_id == it.id)))
            assert len(candidates) == 1 and candidates[0].id == it.candidate_checkpoint_id
            decisions = _count(session, Event, Event.iteration_id == it.id, Event.kind.in_(("promotion", "rejection")))
            assert decisions == 1
            expected_status = CheckpointStatus.champion if it.decision == "promoted" else CheckpointStatus.rejected
            assert candidates[0].status in {expected_status, CheckpointStatus.retired}
    checkpoint_dir = data_dir / "artifacts" / "checkpoints"
    on_disk = sorted(p.name for p in checkpoint_dir.iterdir())
    assert on_disk == [f"ckpt-{i:04d}" for i in range(1, iterations + 1)], on_disk  # no temp dirs, no extra copies


def _replayed_champion(events: list[Event]) -> list[str]:
    """The champion stack the audit trail's champion events build, bottom first."""
    stack: list[str] = []
    for event in events:
        if event.kind == lineage.ROLLBACK_EVENT:
            while stack and stack[-1] != event.checkpoint_id:
                stack.pop()
            assert stack, f"rollback event {event.id} returns to {event.checkpoint_id}, never champion before"
        elif event.kind in (lineage.INITIAL_EVENT, lineage.GATE_PROMOTION_EVENT, lineage.MANUAL_PROMOTION_EVENT):
            if not stack or stack[-1] != event.checkpoint_id:
                stack.append(event.checkpoint_id)
    return stack


def assert_lineage_consistent(sessions: sessionmaker[Session]) -> None:
    """One champion; the pointer equals the stack top; the audit trail replays to both; no
    duplicated stage rows; every checkpoint on disk verifies against its manifest."""
    from workers.checkpoints import verify_checkpoint

    with sessions() as session:
        champions = list(session.scalars(select(Checkpoint.id).where(Checkpoint.status == CheckpointStatus.champion)))
        pointer = lineage.current_champion(session)
        assert pointer is not None and champions == [pointer.id], (champions, pointer)
        stack = lineage.champion_history(session)
        assert stack and stack[-1] == pointer.id, stack
        events = list(session.scalars(select(Event).order_by(Event.id)))
        assert _replayed_champion(events) == stack
        keys = session.execute(select(StageRun.iteration_id, StageRun.stage)).all()
        assert len(keys) == len(set(keys)), "duplicated stage rows"
        paths = dict(session.execute(select(Checkpoint.id, Checkpoint.path)).all())
    for path in paths.values():
        if "://" not in path:  # every registered checkpoint has a manifest, the initial one included
            verify_checkpoint(path)  # raises CheckpointError naming the broken file
