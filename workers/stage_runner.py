"""Runs one stage of one iteration exactly once in effect, whatever the delivery count.

A stage computes outside any transaction, then writes its outputs and its ``succeeded`` row in a
single transaction. A stage found ``succeeded`` returns its stored result and computes nothing,
so a redelivered or re-run task is a no-op.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.db.engine import transaction
from daemon.db.models import Iteration, StageRun, StageStatus, utcnow

log = structlog.get_logger(__name__)

Writer = Callable[[Session], dict[str, Any]]


@dataclass
class StageOutput:
    """What a stage computed: a summary, and a function that writes its rows in the final transaction."""

    result: dict[str, Any]
    write: Writer = field(default=lambda _session: {})


@dataclass
class StageContext:
    settings: Settings
    sessions: sessionmaker[Session]
    iteration_id: int

    def iteration(self, session: Session) -> Iteration:
        iteration = session.get(Iteration, self.iteration_id)
        if iteration is None:
            raise LookupError(f"iteration {self.iteration_id} does not exist")
        return iteration


StageFn = Callable[[StageContext], StageOutput]


def _stage_row(session: Session, iteration_id: int, stage: str) -> StageRun:
    row = session.scalars(
        select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == stage).with_for_update()
    ).one_or_none()
    if row is None:
        row = StageRun(iteration_id=iteration_id, stage=stage, status=StageStatus.pending, attempts=0, result={})
        session.add(row)
        session.flush()
    return row


def _claim(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    """Mark the stage running, or return its stored result if it already succeeded."""
    with transaction(ctx.sessions) as session:
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status == StageStatus.succeeded:
            return dict(row.result)
        row.status = StageStatus.running
        row.attempts += 1
        row.started_at = utcnow()
        row.error = None
        return None


def _commit(ctx: StageContext, stage: str, output: StageOutput, compute_seconds: float) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status == StageStatus.succeeded:
            # A concurrent delivery finished first; its outputs stand and ours are discarded.
            return dict(row.result)
        extra = output.write(session)
        row.result = {**output.result, **extra}
        row.status = StageStatus.succeeded
        row.compute_seconds = compute_seconds
        row.finished_at = utcnow()
        return dict(row.result)


def _record_failure(ctx: StageContext, stage: str, exc: BaseException) -> None:
    with transaction(ctx.sessions) as session:
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status != StageStatus.succeeded:
            row.status = StageStatus.failed
            row.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            row.finished_at = utcnow()


def execute_stage(ctx: StageContext, stage: str, stage_fn: StageFn) -> dict[str, Any]:
    bound = log.bind(iteration_id=ctx.iteration_id, stage=stage)
    stored = _claim(ctx, stage)
    if stored is not None:
        bound.info("stage.already_done")
        return stored
    bound.info("stage.started")
    started = time.perf_counter()
    try:
        output = stage_fn(ctx)
        result = _commit(ctx, stage, output, time.perf_counter() - started)
    except Exception as exc:
        bound.error("stage.failed", error=str(exc))
        _record_failure(ctx, stage, exc)
        raise
    bound.info("stage.succeeded", seconds=round(time.perf_counter() - started, 3), **_scalars(result))
    return result


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
