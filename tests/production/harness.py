"""Real services and real processes for the production-mode tests.

PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are the machine's own; a
service found down is started with the commands CI uses. Each test gets its own database
(random name, dropped afterwards) and its own Redis DB number (flushed before and after), or a
private ``redis-server`` on a free port when the test restarts Redis.

Daemons and workers are the real `kaizen run` / `kaizen worker` commands, each started in a
process group of its own so a test can ``kill -9`` exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
import yaml
from sqlalchemy import func, select
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from daemon.db.models import (
    Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt, Response, StageRun,
    StageStatus,
)
from tests.factories import small_cycle_config
from daemon.stage_specs import CORE_STAGES

REPO = Path(__file__).resolve().parents[2]
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

T = TypeVar("T")


# --------------------------------------------------------------------------- services


def _pg_up() -> bool:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> None:
    if _pg_up():
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
    wait_for(_pg_up, 60, "PostgreSQL to accept connections")


def _redis_up(port: int = REDIS_PORT) -> bool:
    try:
        return bool(redis.Redis(host=REDIS_HOST, port=port, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def ensure_redis() -> None:
    if _redis_up():
        return
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(REDIS_PORT), "--save", "",
         "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"],
        check=True,
    )
    wait_for(_redis_up, 30, "Redis to answer PING")


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test; its SQLAlchemy URL."""
    ensure_postgres()
    name = f"kaizen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_redis_db() -> int:
    """A Redis DB number no other test of this run uses right now (an empty one, claimed by a key)."""
    for _ in range(100):
        number = 1 + uuid.uuid4().int % 15
        db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
        if db.set("kaizen-test-claim", str(os.getpid()), nx=True, ex=3600):
            return number
    raise RuntimeError("no free Redis DB number (1-15) for this test")


@contextlib.contextmanager
def scratch_redis_db() -> Iterator[str]:
    """A Redis DB number of the shared server for one test; its broker URL."""
    ensure_redis()
    number = _free_redis_db()
    db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
    for key in db.keys("*"):
        if key != b"kaizen-test-claim":
            db.delete(key)
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}"
    finally:
        db.flushdb()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrivateRedis:
    """A redis-server of this test's own, without persistence: a restart loses every message."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        wait_for(lambda: _redis_up(self.port), 30, "the private redis-server")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


# --------------------------------------------------------------------------- processes


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


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
    log_path = cwd / f"{name}.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    base_env["PYTHONPATH"] = str(REPO)
    popen = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *args], cwd=cwd, env={**base_env, **(env or {})},
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
