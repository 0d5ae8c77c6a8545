"""Prometheus metrics read from the lineage DB at scrape time.

The daemon, its workers and the dashboard are separate processes; the lineage DB is the one
place that knows every cycle, so a collector that queries it is right in any process that
mounts it (``create_dashboard_app`` serves it at ``/metrics``) and survives restarts without
losing counts. A scrape costs a handful of indexed, aggregate queries (see ops/bench/dashboard.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric, SummaryMetricFamily
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from daemon.db import lineage
from daemon.db.models import Evaluation, Event, Iteration, IterationStatus, StageRun, StageStatus

log = structlog.get_logger(__name__)


def _iteration_counts(session: Session) -> Metric:
    family = CounterMetricFamily(
        "kaizen_iterations", "Iterations (cycles) by status and gate decision", labels=["status", "decision"]
    )
    rows = session.execute(select(Iteration.status, Iteration.decision, func.count()).group_by(Iteration.status, Iteration.decision))
    for status, decision, count in rows:
        family.add_metric([status.value, decision or "none"], count)
    return family


class StageTotals:
    """Per-stage count and sum of compute seconds over all succeeded stage runs, kept incrementally.

    The stage runs of a finished iteration never change again, so their totals are summed once
    and cached up to a watermark (the newest iteration below which every iteration is finished);
    a scrape then reads only the stage runs above it: a few rows, not the whole table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watermark = 0
        self._cached: dict[str, tuple[int, float]] = {}

    @staticmethod
    def _sums(session: Session, above: int, up_to: int | None) -> dict[str, tuple[int, float]]:
        # The status test sits in the aggregates, not the WHERE clause: with only the iteration
        # range there, every planner walks the (iteration_id, stage) key instead of all the
        # succeeded rows of the (status, stage) index.
        succeeded = StageRun.status == StageStatus.succeeded
        query = (
            select(
                StageRun.stage,
                func.coalesce(func.sum(case((succeeded, 1), else_=0)), 0),
                func.coalesce(func.sum(case((succeeded, StageRun.compute_seconds), else_=0.0)), 0.0),
            )
            .where(StageRun.iteration_id > above)
            .group_by(StageRun.stage)
        )
        if up_to is not None:
            query = query.where(StageRun.iteration_id <= up_to)
        return {stage: (int(count), float(total)) for stage, count, total in session.execute(query) if count}

    def totals(self, session: Session) -> dict[str, tuple[int, float]]:
        first_running = session.scalar(select(func.min(Iteration.id)).where(Iteration.status == IterationStatus.running))
        newest = session.scalar(select(func.max(Iteration.id))) or 0
        settled = newest if first_running is None else first_running - 1
        with self._lock:
            if settled > self._watermark:
                self._cached = _add(self._cached, self._sums(session, self._watermark, settled))
                self._watermark = settled
            cached, watermark = dict(self._cached), self._watermark
        return _add(cached, self._sums(session, watermark, None))


def _add(a: dict[str, tuple[int, float]], b: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    return {k: (a.get(k, (0, 0.0))[0] + b.get(k, (0, 0.0))[0], a.get(k, (0, 0.0))[1] + b.get(k, (0, 0.0))[1]) for k in a.keys() | b.keys()}


def _stage_durations(session: Session, totals: StageTotals) -> Iterator[Metric]:
    summary = SummaryMetricFamily(
        "kaizen_stage_duration_seconds", "Compute time of succeeded stage runs", labels=["stage"]
    )
    for stage, (count, total) in sorted(totals.totals(session).items()):
        summary.add_metric([stage], count_value=count, sum_value=total)
    yield summary
    last = GaugeMetricFamily(
        "kaizen_last_stage_duration_seconds", "Stage compute time in the last completed iteration", labels=["stage"]
    )
    last_completed = session.scalar(select(func.max(Iteration.id)).where(Iteration.status == IterationStatus.completed))
    if last_completed is not None:
        for stage, seconds in session.execute(
            select(StageRun.stage, StageRun.compute_seconds).where(StageRun.iteration_id == last_completed)
        ):
            if seconds is not None:
                last.add_metric([stage], seconds)
    yield last


def _gate(session: Session) -> Iterator[Metric]:
    latest = session.scalars(
        select(Evaluation).where(Evaluation.win_rate.is_not(None)).order_by(Evaluation.iteration_id.desc()).limit(1)
    ).first()
    win = GaugeMetricFamily("kaizen_gate_win_rate", "Candidate win rate against the champion in the last gated iteration")
    bound = GaugeMetricFamily("kaizen_gate_win_rate_lower_bound", "Wilson lower bound of that win rate")
    which = GaugeMetricFamily("kaizen_gate_last_iteration", "Iteration whose gate the win-rate gauges describe")
    if latest is not None:
        win.add_metric([], latest.win_rate)
        if latest.win_rate_lower_bound is not None:
            bound.add_metric([], latest.win_rate_lower_bound)
        which.add_metric([], latest.iteration_id)
    yield from (win, bound, which)


def _champion_and_control(session: Session) -> Iterator[Metric]:
    champion = lineage.current_champion(session)
    info = InfoMetricFamily("kaizen_champion", "The checkpoint being served and improved")
    if champion is not None:
        info.add_metric([], {"checkpoint": champion.id, "base_model": champion.base_model})
    yield info
    yield GaugeMetricFamily("kaizen_paused", "1 while `kaizen pause` holds the daemon", value=1 if lineage.pause_state(session).paused else 0)
    running = session.scalar(select(func.count()).select_from(Iteration).where(Iteration.status == IterationStatus.running)) or 0
    yield GaugeMetricFamily("kaizen_running_iterations", "Iterations started and not finished", value=running)


def _queue_depth(session: Session) -> Metric:
    # The lineage DB is the source of truth for stage work: a stage is queued once the daemon has
    # dispatched it (queued_at set) and until a worker claims it (status running).
    depth = GaugeMetricFamily("kaizen_stage_queue_depth", "Stage runs dispatched and not finished", labels=["state"])
    queued = session.scalar(
        select(func.count()).select_from(StageRun).where(StageRun.status == StageStatus.pending, StageRun.queued_at.is_not(None))
    )
    running = session.scalar(select(func.count()).select_from(StageRun).where(StageRun.status == StageStatus.running))
    depth.add_metric(["queued"], queued or 0)
    depth.add_metric(["running"], running or 0)
    return depth


def _events(session: Session) -> Metric:
    family = CounterMetricFamily("kaizen_events", "Audited lineage events by kind (promotions, rollbacks, pauses, ...)", labels=["kind"])
    for kind, count in session.execute(select(Event.kind, func.count()).group_by(Event.kind)):
        family.add_metric([kind], count)
    return family


class LineageCollector:
    """A prometheus_client custom collector over the lineage DB."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.stage_totals = StageTotals()

    def describe(self) -> list[Metric]:
        return []  # no DB query at registration time

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            metrics = [
                _iteration_counts(session),
                *_stage_durations(session, self.stage_totals),
                *_gate(session),
                *_champion_and_control(session),
                _queue_depth(session),
                _events(session),
            ]
        yield from metrics


def lineage_registry(sessions: sessionmaker[Session]) -> CollectorRegistry:
    """A registry of its own, so several apps (or tests) in one process do not collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LineageCollector(sessions))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
