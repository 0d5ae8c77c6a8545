"""The daemon: APScheduler fires cycles; each cycle runs its stages through a dispatcher."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING

import structlog
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.cycle import CycleError, CycleStopped, StageDispatcher, run_cycle
from daemon.leader import LeaderElection

if TYPE_CHECKING:
    from daemon.db.lineage import PauseState

log = structlog.get_logger(__name__)

CYCLE_JOB_ID = "kaizen-cycle"
GAVE_UP_EVENT = "daemon_gave_up"


class Daemon:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], dispatcher: StageDispatcher, max_cycles: int | None = None,
        leader: LeaderElection | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.dispatcher = dispatcher
        # Set when several daemons may share the lineage DB (`kaizen run`): checked before every
        # cycle, so a daemon that lost its leader lock stops instead of racing the new leader.
        self.leader = leader
        self.max_cycles = max_cycles if max_cycles is not None else settings.schedule.max_cycles
        self.completed = 0
        self.failures = 0
        self.gave_up: str | None = None
        self.scheduler = BlockingScheduler(timezone="UTC")
        # SIGTERM/SIGINT: no new stage starts, the waits end, the leader lock is released on the way out.
        self.stopping = threading.Event()
        self._lock_unknown_since: float | None = None
        self._retry_at = 0.0
        self.stop_signal: str | None = None
        if hasattr(dispatcher, "stop_event"):
            dispatcher.stop_event = self.stopping
        self._lock = threading.Lock()

    def _trigger(self):  # type: ignore[no-untyped-def]
        schedule = self.settings.schedule
        if schedule.cron:
            return CronTrigger.from_crontab(schedule.cron, timezone="UTC")
        return IntervalTrigger(seconds=schedule.interval_seconds)

    def _paused(self) -> bool:
        """`kaizen pause` holds every cycle, a new one and an interrupted one alike, until resume.

        An interrupted iteration stays `running` in the DB and is resumed after `kaizen resume`.
        """
        from daemon.db.engine import retry_while_unreachable

        # The tick's first read of the lineage DB: a restart or a blip is waited out with backoff
        # like the cycle's other calls, instead of failing the tick with a traceback every interval.
        state = retry_while_unreachable(self._read_pause_state, "reading the pause state", self.settings.schedule.db_outage_seconds)
        if state.paused != getattr(self, "_was_paused", False):
            self._was_paused = state.paused
            if state.paused:
                log.info("daemon.paused", by=state.changed_by, reason=state.reason)
            else:
                log.info("daemon.resumed")
        return state.paused

    def _read_pause_state(self) -> PauseState:
        from daemon.db.lineage import pause_state

        with self.sessions() as session:
            return pause_state(session)

    def _still_leader(self) -> bool:
        leading = True if self.leader is None else self.leader.still_leader()
        if leading:
            self._lock_unknown_since = None
            return True
        if leading is None:  # the lineage DB is away: skip this tick, ask again on the next
            self._lock_unknown_since = self._lock_unknown_since or time.monotonic()
            if time.monotonic() - self._lock_unknown_since < self.settings.schedule.db_outage_seconds:
                return False
            self.gave_up = f"the lineage DB has been unreachable for {self.settings.schedule.db_outage_seconds:g}s (schedule.db_outage_seconds)"
        else:
            self.gave_up = "another daemon took the leader lock while this one was cut off from the lineage DB; it leads now. Restart to rejoin as standby"
        log.error("daemon.giving_up", reason=self.gave_up)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        return False

    def _record_giving_up(self) -> None:
        """An event for the dashboard and /metrics (kaizen_events_total{kind="daemon_gave_up"})."""
        from daemon.db.engine import transaction
        from daemon.db.models import Event

        try:
            with transaction(self.sessions) as session:
                session.add(Event(kind=GAVE_UP_EVENT, actor="daemon", reason=self.gave_up))
        except Exception as exc:  # noqa: BLE001 - the DB may be why we give up; the log line stands
            log.warning("daemon.giving_up_not_recorded", error=str(exc).splitlines()[0])

    def _backing_off(self) -> bool:
        """After a failed cycle, wait interval x 2^(failures-1) (capped) before the next attempt."""
        return time.monotonic() < self._retry_at

    def _tick(self) -> None:
        if self.max_cycles is not None and self.completed >= self.max_cycles:
            return
        if not self._still_leader() or self._backing_off():
            return
        if self._paused():
            return
        try:
            report = run_cycle(
                self.sessions, self.settings, self.dispatcher, progress=self._stage_progress(), should_stop=self.stopping.is_set
            )
        except CycleStopped as exc:
            log.info("cycle.stopped", reason=str(exc))
            return
        except CycleError as exc:
            self.failures += 1
            wait = min(self.settings.schedule.max_failure_backoff_seconds, (self.settings.schedule.interval_seconds or 5.0) * 2 ** (self.failures - 1))
            self._retry_at = time.monotonic() + wait
            log.error("cycle.failed", error=str(exc), consecutive_failures=self.failures, next_attempt_in_seconds=round(wait, 1))
            limit = self.settings.schedule.max_consecutive_failures
            if limit is not None and self.failures >= limit:
                self.gave_up = f"{self.failures} cycles failed in a row; last error: {exc}"
                log.error("daemon.giving_up", reason=self.gave_up)
                self._record_giving_up()
                if self.scheduler.running:
                    self.scheduler.shutdown(wait=False)
            return
        self.failures = 0
        with self._lock:
            self.completed += 1
            done = self.max_cycles is not None and self.completed >= self.max_cycles
        if done:
            log.info("daemon.max_cycles_reached", cycles=self.completed)
            self.scheduler.shutdown(wait=False)

    def _stage_progress(self):  # type: ignore[no-untyped-def]
        """`kaizen run` draws no progress bar (its output is often a log file): one line as each
        stage starts and one as it ends, with its wall time, so a user can see the cycle advance."""
        cycle = f"{self.completed + 1}/{self.max_cycles}" if self.max_cycles is not None else str(self.completed + 1)
        started: dict[str, float] = {}

        def on_progress(stage: str, state: str) -> None:
            if state == "running":
                started[stage] = time.perf_counter()
                log.info("stage.started", cycle=cycle, stage=stage)
            elif state == "done":
                log.info("stage.finished", cycle=cycle, stage=stage, seconds=round(time.perf_counter() - started.pop(stage), 1))

        return on_progress

    def _on_job_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("scheduler.job_missed", scheduled=str(event.scheduled_run_time))
        else:
            log.error("scheduler.job_error", error=repr(event.exception))

    def run(self) -> None:
        from datetime import datetime, timezone

        # A tick that finds the previous cycle still running is the normal case when cycles outlast
        # the interval; APScheduler would warn about it on every tick.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)

        self.scheduler.add_listener(self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        # The first run is now: a restarted daemon resumes an interrupted cycle at once.
        self.scheduler.add_job(
            self._tick, self._trigger(), id=CYCLE_JOB_ID, max_instances=1, coalesce=True,
            misfire_grace_time=3600, next_run_time=datetime.now(timezone.utc),
        )
        log.info("daemon.started", max_cycles=self.max_cycles)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)
        try:
            self.scheduler.start()
        except (KeyboardInterrupt, SystemExit):
            self.stopping.set()
            log.info("daemon.stopping", signal=self.stop_signal or "SIGINT", action="letting the running tick end; no new stage starts")
            if self.scheduler.running:
                self.scheduler.shutdown(wait=True)
            log.info("daemon.stopped", signal=self.stop_signal or "SIGINT", resumes=self._resume_note())

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signal.Signals(signum).name
        self.stopping.set()
        raise KeyboardInterrupt  # out of the scheduler's wait in the main thread

    def _resume_note(self) -> str:
        """What the next start picks up: the running iteration's first unfinished stage, if any."""
        from sqlalchemy import select

        from daemon.db.models import Iteration, IterationStatus, StageRun, StageStatus
        from daemon.stage_specs import STAGE_ORDER

        with self.sessions() as session:
            running = session.scalars(select(Iteration).where(Iteration.status == IterationStatus.running)).first()
            if running is None:
                return "nothing: no iteration is in progress"
            rows = {r.stage: r.status for r in session.scalars(select(StageRun).where(StageRun.iteration_id == running.id))}
        todo = next((s for s in STAGE_ORDER if s in rows and rows[s] != StageStatus.succeeded), None)
        return f"iteration {running.id} at {todo}" if todo else f"iteration {running.id} (its stages are done)"
