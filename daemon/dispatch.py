"""How the daemon gets a stage run: in its own process, or by a Celery worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.db.engine import retry_while_unreachable
from daemon.db.lineage import lineage_uuid
from daemon.db.models import Iteration, IterationStatus, StageRun, StageStatus
from daemon.stage_runner import execute_stage
from daemon.stage_runs import StageContext, lease_is_live, stage_input_hash

log = structlog.get_logger(__name__)

T = TypeVar("T")


class EagerDispatcher:
    """Runs stages in the calling process: the simplest embedded mode, and the tests' default."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def run_stage(self, iteration_id: int, stage: str) -> dict[str, Any]:
        from daemon.stage_specs import stage_function

        ctx = StageContext(settings=self.settings, sessions=self.sessions, iteration_id=iteration_id)
        return execute_stage(ctx, stage, stage_function(stage))


class DispatchStopped(RuntimeError):
    """The daemon stopped waiting for a stage because it is shutting down."""


class BrokerUnavailable(RuntimeError):
    """The broker refused every publish for worker.publish_retry_seconds."""


class RedispatchTimer:
    """When to send a stage again that no worker holds: after ``first`` seconds, then 2x, 4x ... up
    to ``cap``. Resets once a worker is seen holding the stage, so a later crash is answered fast."""

    def __init__(self, first: float, cap: float = 600.0) -> None:
        self.first = first
        self.cap = max(cap, first)
        self.interval = first
        self.last_sent = time.monotonic()

    def sent(self) -> None:
        self.last_sent = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last_sent >= self.interval

    def backed_off(self) -> None:
        self.interval = min(self.interval * 2, self.cap)

    def worker_seen(self) -> None:
        self.interval = self.first


class CeleryDispatcher:
    """Sends a stage to the workers and waits on the lineage DB, which is the source of truth.

    Delivery is at least once, and a message can also be lost (a Redis restart without
    persistence drops queued and unacked messages). So while it waits, the daemon watches the
    stage row and sends the stage again when no live worker holds it: still unclaimed after
    ``worker.redispatch_seconds`` (doubling), or claimed by a worker whose lease expired (killed,
    machine lost). Duplicates are harmless: the stage runner returns the stored result, or
    leaves the stage to the live lease holder.
    """

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], poll_seconds: float = 0.05,
        worker_health: Callable[[], str | None] | None = None,
    ) -> None:
        from workers.celery_app import make_celery

        self.settings = settings
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        # Returns why the worker this daemon owns is gone, if it is: a wait on a dead worker
        # would otherwise last the whole stage timeout.
        self.worker_health = worker_health
        self.app = make_celery(settings)
        # Messages go to this lineage's own queues and carry its uuid (workers/lineage_queues.py).
        self.lineage_id = self._db(self._lineage_id, "reading the lineage id")
        self.redispatches = 0
        # Set by the daemon on SIGTERM/SIGINT: stop waiting; the stage's worker keeps its lease.
        self.stop_event = threading.Event()

    def run_stage(self, iteration_id: int, stage: str) -> dict[str, Any]:
        bound = log.bind(iteration_id=iteration_id, stage=stage)
        input_hash = self._db(lambda: self._input_hash(iteration_id, stage), f"hashing the inputs of {stage}")
        attempts_before = self._row(iteration_id, stage).attempts
        self._publish(iteration_id, stage, input_hash)
        timer = RedispatchTimer(self.settings.worker.redispatch_seconds)
        deadline = time.monotonic() + self.settings.worker.stage_timeout_seconds
        while time.monotonic() < deadline:
            row = self._row(iteration_id, stage)
            if row.status == StageStatus.succeeded:
                return dict(row.result)
            if row.status == StageStatus.failed and (row.attempts > attempts_before or not self._iteration_running(iteration_id)):
                raise RuntimeError(row.error or "stage failed in the worker")
            if self.stop_event.is_set():
                raise DispatchStopped(f"the daemon is stopping; {stage} of iteration {iteration_id} is left to its worker")
            problem = self.worker_health() if self.worker_health else None
            if problem:
                raise RuntimeError(problem)
            if lease_is_live(row):
                timer.worker_seen()
            elif timer.due():
                bound.warning("stage.redispatch", reason=_unheld_reason(row), waited_seconds=round(time.monotonic() - timer.last_sent, 1))
                self._publish(iteration_id, stage, input_hash)
                self.redispatches += 1
                timer.sent()
                timer.backed_off()
            time.sleep(self.poll_seconds)
        raise TimeoutError(f"stage {stage} did not finish within worker.stage_timeout_seconds")

    def _publish(self, iteration_id: int, stage: str, input_hash: str) -> None:
        """Send the stage; retry while the broker is unreachable (e.g. restarting), then give up."""
        from kombu.exceptions import OperationalError

        from workers.celery_app import publish_stage

        deadline = time.monotonic() + self.settings.worker.publish_retry_seconds
        delay = 0.25
        while True:
            try:
                publish_stage(self.app, self.lineage_id, iteration_id, stage, input_hash)
                return
            except (OperationalError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(
                        f"cannot publish stage {stage} to the broker {_redacted(self.settings.resolved_broker_url)}: {exc}. "
                        "Is it running and reachable? (worker.broker_url)"
                    ) from exc
                log.warning("broker.unreachable", stage=stage, error=str(exc), retry_in=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _db(self, fn: Callable[[], T], what: str) -> T:
        # A lineage DB restart while a stage runs must not end the cycle: the stage goes on in its
        # worker, and the wait resumes once the DB answers again.
        return retry_while_unreachable(fn, what, self.settings.schedule.db_outage_seconds)

    def _lineage_id(self) -> str:
        with self.sessions() as session:
            found = lineage_uuid(session)
        if found is None:
            raise RuntimeError("the lineage DB has no lineage id: it is not migrated to head (`kaizen init`)")
        return found

    def _input_hash(self, iteration_id: int, stage: str) -> str:
        with self.sessions() as session:
            return stage_input_hash(session, iteration_id, stage)

    def _iteration_running(self, iteration_id: int) -> bool:
        def read() -> bool:
            with self.sessions() as session:
                iteration = session.get(Iteration, iteration_id)
                return iteration is not None and iteration.status == IterationStatus.running

        return self._db(read, "reading the iteration")

    def _row(self, iteration_id: int, stage: str) -> StageRun:
        def read() -> StageRun:
            with self.sessions() as session:
                return session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == stage)).one()

        return self._db(read, f"waiting for {stage}")


def _unheld_reason(row: StageRun) -> str:
    if row.status == StageStatus.running:
        return f"the lease of {row.worker_id} expired at {row.lease_expires_at} (worker gone?)"
    return f"no worker has claimed it (status {row.status.value}); the message may have been lost"


def _redacted(url: str) -> str:
    """The broker URL without its password, for error messages."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


class LocalWorker:
    """A Celery worker subprocess the daemon owns in the embedded `local` mode."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from daemon.db.integrity import renew_damaged_broker_db

        renew_damaged_broker_db(self.settings.resolved_broker_url)  # disposable: a damaged one is recreated
        config_path = self.settings.resolved_data_dir / "worker-config.yaml"
        config_path.write_text(yaml.safe_dump(self.settings.snapshot()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
        # The file holds the snapshot, secrets masked; the secrets travel in the environment.
        env.update(self.settings.secret_env())
        env["KAIZEN_CONFIG"] = str(config_path)
        from workers.owner import OWNER_ENV

        env[OWNER_ENV] = str(os.getpid())  # the worker kills itself once this daemon is gone (workers/owner.py)
        log_path = self.settings.resolved_data_dir / "worker.log"
        self.process = subprocess.Popen(
            worker_command(queues=["gpu", "cpu"], concurrency=1),
            env=env,
            stdout=open(log_path, "ab"),  # noqa: SIM115 - owned by the child for its lifetime
            stderr=subprocess.STDOUT,
            # A process group of its own: stop() ends the worker and every pool process it forked.
            start_new_session=True,
        )
        log.info("worker.started", pid=self.process.pid, log=str(log_path))

    def health(self) -> str | None:
        """None while the worker runs; else why it stopped. A dead worker is restarted, so the
        next cycle attempt resumes the interrupted stage on a fresh one."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        log_path = self.settings.resolved_data_dir / "worker.log"
        log.error("worker.died", exit_code=code, log=str(log_path))
        self.start()
        return f"the local worker exited with code {code} (see {log_path}); it has been restarted"

    def stop(self) -> None:
        """Stop the worker warmly, then make sure nothing of it is left.

        SIGTERM to the Celery main process alone is its warm shutdown: it asks its pool to save a
        running trainer's state and hand the stage over (workers/graceful_stop.py) and lets any
        other stage finish. It gets ``worker.soft_shutdown_seconds`` for that; then the whole group
        gets SIGKILL, whether the main process exited or not, so no pool process outlives the daemon.
        (A SIGTERM to the group, as before, killed the pool before it could save.)
        """
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the worker leads its own group
        grace = self.settings.worker.soft_shutdown_seconds
        try:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
                log.info("worker.stopping", pid=group, grace_seconds=grace, action="warm shutdown: a running trainer saves and hands over")
            if not _exits_within(group, grace):
                log.warning("worker.kill", pid=group, reason=f"still running {grace:g} s after SIGTERM (worker.soft_shutdown_seconds)")
        finally:
            # The main process is not reaped yet (a zombie at worst), so the group id still names
            # only its processes: pool processes that outlived it die here.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None


def _exits_within(pid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for child ``pid`` to exit, without reaping it; True once it has."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def worker_command(queues: list[str], concurrency: int = 1, loglevel: str = "warning") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app:app", "worker",
        "--queues", ",".join(queues), "--concurrency", str(concurrency), "--loglevel", loglevel,
        "--without-gossip", "--without-mingle", "--hostname", f"kaizen-{os.getpid()}@%h",
    ]


def make_dispatcher(
    settings: Settings, sessions: sessionmaker[Session], worker: LocalWorker | None = None
) -> EagerDispatcher | CeleryDispatcher:
    if settings.worker.mode == "eager":
        return EagerDispatcher(settings, sessions)
    return CeleryDispatcher(settings, sessions, worker_health=worker.health if worker else None)

