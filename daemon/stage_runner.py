"""Runs one stage of one iteration exactly once in effect, whatever the delivery count.

Celery over Redis delivers a task *at least* once: a worker killed mid-task leaves its message
unacked and it comes back; the daemon re-sends a stage whose message the broker lost. The
lineage DB turns that into exactly-once effects:

* **Key.** A stage result is keyed by (iteration, stage, input hash). The input hash digests
  what the stage reads: the iteration's parent checkpoint and config snapshot, and the result
  and input hash of every upstream stage. A delivery whose inputs differ from the stored
  result's refuses to return it (:class:`StageInputMismatch`).
* **Stored result.** A stage found ``succeeded`` returns its stored result and computes nothing.
* **Lease.** Computing starts with a claim in one transaction (row lock): status ``running``,
  a fresh ``worker_id`` and ``lease_expires_at``. A heartbeat thread renews the lease every
  ``worker.lease_seconds / 3`` while the stage computes. A second delivery that finds a live
  lease waits up to one lease period for the stage to finish (then returns the stored result)
  or for the lease to expire (the holder died: it takes over and computes again); if the holder
  is still alive after that, it leaves the stage to it (:class:`StageHeldElsewhere`).
* **Only for a running iteration.** A delivery for an iteration that is parked, failed or
  completed is dropped (and acknowledged) without computing, and a commit re-checks it under the
  iteration's row lock: a parked iteration never gets a candidate no gate saw.
* **Attempt cap.** Each claim counts one attempt on the row. A delivery that would take the stage
  over after ``worker.max_stage_attempts`` claims (each worker died mid-stage: OOM, a crash that
  kills the process) fails the stage and its iteration for good, with a ``stage_gave_up`` event,
  instead of letting Celery's requeue loop forever.
* **Hand-over.** A stage interrupted by its worker's warm shutdown (:class:`StageInterrupted`,
  after saving its trainer state) goes back to ``pending`` with its lease released and its
  attempt uncounted: the next delivery claims it at once and resumes from the saved state.
* **Fenced commit.** A stage computes outside any transaction, then writes its outputs and its
  ``succeeded`` row in one transaction that first checks the row is still claimed by this
  worker: a worker whose lease was taken over discards its work (:class:`LeaseLost`), so two
  deliveries never both write.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon.db.engine import transaction
from daemon.db.models import Event, Iteration, IterationStatus, StageRun, StageStatus, utcnow
from daemon.stage_runs import (
    GAVE_UP_EVENT,
    IterationNotRunning,
    LeaseLost,
    StageContext,
    StageFn,
    StageGaveUp,
    StageHeldElsewhere,
    StageInputMismatch,
    StageInterrupted,
    StageOutput,
    StaleStageMessage,
    as_utc,
    lease_is_live,
    new_worker_id,
    recorded_context,
    stage_input_hash,
)

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- claim, lease, commit


@dataclass(frozen=True)
class Claim:
    state: Literal["done", "mine", "held", "gave_up"]
    result: dict[str, Any] | None = None
    holder: str | None = None
    lease_expires_at: datetime | None = None


def _stage_row(session: Session, iteration_id: int, stage: str) -> StageRun:
    row = session.scalars(
        select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == stage).with_for_update()
    ).one_or_none()
    if row is None:
        row = StageRun(iteration_id=iteration_id, stage=stage, status=StageStatus.pending, attempts=0, result={})
        session.add(row)
        session.flush()
    return row


def _locked_iteration(session: Session, iteration_id: int) -> Iteration:
    """The iteration, row-locked: always before its stage rows, one lock order for claims and commits."""
    iteration = session.get(Iteration, iteration_id, with_for_update=True)
    if iteration is None:
        raise LookupError(f"iteration {iteration_id} does not exist")
    return iteration


def _require_running(iteration: Iteration, stage: str) -> None:
    if iteration.status != IterationStatus.running:
        raise IterationNotRunning(f"iteration {iteration.id} is {iteration.status.value}; its {stage} is not run any more")


def _give_up(session: Session, iteration: Iteration, row: StageRun, worker_id: str) -> None:
    reason = (
        f"{row.stage} was claimed {row.attempts} times (worker.max_stage_attempts) and no attempt finished or recorded an "
        "error: each worker died mid-stage (out of memory? killed?); the stage failed for good"
    )
    row.status = StageStatus.failed
    row.error = reason
    row.finished_at = utcnow()
    row.lease_expires_at = None
    iteration.status = IterationStatus.failed
    iteration.error = reason
    iteration.finished_at = utcnow()
    session.add(Event(kind=GAVE_UP_EVENT, iteration_id=iteration.id, actor=worker_id, reason=reason))


def _claim(ctx: StageContext, stage: str, worker_id: str, expected_input_hash: str | None) -> Claim:
    """Return the stored result, take the stage (a new or expired lease), report its holder, or give up on it."""
    lease = timedelta(seconds=ctx.settings.worker.lease_seconds)
    with transaction(ctx.sessions) as session:
        iteration = _locked_iteration(session, ctx.iteration_id)
        row = _stage_row(session, ctx.iteration_id, stage)
        input_hash = stage_input_hash(session, ctx.iteration_id, stage)
        if expected_input_hash is not None and expected_input_hash != input_hash:
            raise StaleStageMessage(
                f"iteration {ctx.iteration_id} {stage}: the message was sent for inputs {expected_input_hash[:12]}, "
                f"the lineage DB now holds {input_hash[:12]} (was the DB reset while messages were queued?)"
            )
        if row.status == StageStatus.succeeded:
            if row.input_hash is not None and row.input_hash != input_hash:
                raise StageInputMismatch(
                    f"iteration {ctx.iteration_id} {stage}: the stored result was computed from inputs "
                    f"{row.input_hash[:12]} but the stage's inputs are now {input_hash[:12]}; an upstream row was "
                    "changed by hand? Start a new iteration instead of editing a finished one."
                )
            return Claim("done", result=dict(row.result))  # returning a stored result starts nothing
        _require_running(iteration, stage)
        now = utcnow()
        if lease_is_live(row, now):
            return Claim("held", holder=row.worker_id, lease_expires_at=as_utc(row.lease_expires_at))
        if row.attempts >= ctx.settings.worker.max_stage_attempts:
            _give_up(session, iteration, row, worker_id)
            return Claim("gave_up", holder=row.error)
        if row.status == StageStatus.running:
            log.warning("stage.taking_over", iteration_id=ctx.iteration_id, stage=stage, previous_worker=row.worker_id,
                        lease_expired_at=str(row.lease_expires_at))
        row.status = StageStatus.running
        row.attempts += 1
        row.started_at = now
        row.finished_at = None
        row.error = None
        row.input_hash = input_hash
        row.worker_id = worker_id
        row.heartbeat_at = now
        row.lease_expires_at = now + lease
        return Claim("mine")


class _LeaseKeeper:
    """Renews this worker's lease on a stage while it computes, from a background thread.

    torch releases the GIL in its kernels, so the renewal runs during hours of training. A
    renewal that finds the row claimed by someone else stops: the commit will be refused anyway.
    """

    def __init__(self, ctx: StageContext, stage: str, worker_id: str) -> None:
        self.ctx = ctx
        self.stage = stage
        self.worker_id = worker_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{stage}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        lease_seconds = self.ctx.settings.worker.lease_seconds
        while not self._stop.wait(lease_seconds / 3):
            try:
                renewed = self._renew(lease_seconds)
            except Exception as exc:  # the DB may be briefly unreachable: try again next period
                log.warning("stage.lease_renewal_failed", stage=self.stage, error=str(exc))
                continue
            if not renewed:
                self.lost = True
                log.error("stage.lease_lost", iteration_id=self.ctx.iteration_id, stage=self.stage, worker_id=self.worker_id)
                return

    def _renew(self, lease_seconds: float) -> bool:
        now = utcnow()
        with transaction(self.ctx.sessions) as session:
            outcome = session.execute(
                update(StageRun)
                .where(
                    StageRun.iteration_id == self.ctx.iteration_id,
                    StageRun.stage == self.stage,
                    StageRun.worker_id == self.worker_id,
                    StageRun.status == StageStatus.running,
                )
                .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            return bool(outcome.rowcount)


def _commit(ctx: StageContext, stage: str, worker_id: str, output: StageOutput, compute_seconds: float) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        _require_running(_locked_iteration(session, ctx.iteration_id), stage)  # parked while this computed: discard
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status == StageStatus.succeeded:
            # A concurrent delivery finished first; its outputs stand and ours are discarded.
            return dict(row.result)
        if row.worker_id != worker_id:
            raise LeaseLost(
                f"iteration {ctx.iteration_id} {stage}: the lease passed to {row.worker_id} while {worker_id} computed; "
                "this result is discarded"
            )
        extra = output.write(session)
        row.result = {**output.result, **extra}
        row.status = StageStatus.succeeded
        row.compute_seconds = compute_seconds
        row.finished_at = utcnow()
        row.lease_expires_at = None
        return dict(row.result)


def _record_failure(ctx: StageContext, stage: str, worker_id: str, exc: BaseException) -> None:
    with transaction(ctx.sessions) as session:
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status != StageStatus.succeeded and row.worker_id == worker_id:
            row.status = StageStatus.failed
            row.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            row.finished_at = utcnow()
            row.lease_expires_at = None


def _hand_over(ctx: StageContext, stage: str, worker_id: str, exc: StageInterrupted) -> None:
    """Release this worker's claim: pending again, no live lease, this attempt not counted."""
    with transaction(ctx.sessions) as session:
        row = _stage_row(session, ctx.iteration_id, stage)
        if row.status == StageStatus.running and row.worker_id == worker_id:
            row.status = StageStatus.pending
            row.attempts = max(row.attempts - 1, 0)
            row.lease_expires_at = None
            row.error = f"handed over by {worker_id}: {exc}"


def _claim_or_wait(ctx: StageContext, stage: str, worker_id: str, expected_input_hash: str | None) -> Claim:
    """Claim the stage; if a live lease holds it, wait up to one lease period for it to finish or expire."""
    claim = _claim(ctx, stage, worker_id, expected_input_hash)
    if claim.state != "held":
        return claim
    lease_seconds = ctx.settings.worker.lease_seconds
    log.info("stage.held_elsewhere", iteration_id=ctx.iteration_id, stage=stage, holder=claim.holder, waiting_seconds=lease_seconds)
    deadline = time.monotonic() + lease_seconds * 1.2
    poll = min(1.0, max(0.05, lease_seconds / 20))
    while time.monotonic() < deadline:
        time.sleep(poll)
        claim = _claim(ctx, stage, worker_id, expected_input_hash)
        if claim.state != "held":
            return claim
    raise StageHeldElsewhere(
        f"iteration {ctx.iteration_id} {stage} is being computed by {claim.holder} (lease renewed until "
        f"{claim.lease_expires_at}); this delivery leaves it to that worker"
    )


def execute_stage(ctx: StageContext, stage: str, stage_fn: StageFn, *, expected_input_hash: str | None = None) -> dict[str, Any]:
    """Run ``stage`` of ``ctx.iteration_id`` unless it already ran; return its (stored) result.

    Raises :class:`StageDeliveryDropped` subclasses when this delivery must not compute (another
    live worker holds the stage, the lease was lost, the message is stale); any exception of the
    stage itself is recorded on the row and re-raised.
    """
    worker_id = new_worker_id()
    bound = log.bind(iteration_id=ctx.iteration_id, stage=stage, worker_id=worker_id)
    claim = _claim_or_wait(ctx, stage, worker_id, expected_input_hash)
    if claim.state == "gave_up":
        bound.error("stage.gave_up", reason=claim.holder)
        raise StageGaveUp(claim.holder or "gave up")
    if claim.state == "done":
        bound.info("stage.already_done")
        assert claim.result is not None
        return claim.result
    bound.info("stage.started")
    started = time.perf_counter()
    with _LeaseKeeper(ctx, stage, worker_id) as keeper:
        try:
            output = stage_fn(recorded_context(ctx))
        except StageInterrupted as exc:
            bound.warning("stage.handed_over", reason=str(exc))
            _hand_over(ctx, stage, worker_id, exc)
            raise
        except Exception as exc:
            bound.error("stage.failed", error=str(exc))
            _record_failure(ctx, stage, worker_id, exc)
            raise
    if keeper.lost:
        bound.warning("stage.committing_after_lease_loss")  # the fenced commit decides
    try:
        result = _commit(ctx, stage, worker_id, output, time.perf_counter() - started)
    except (LeaseLost, IterationNotRunning) as exc:
        bound.warning("stage.result_discarded", reason=str(exc))
        raise
    except Exception as exc:
        bound.error("stage.failed", error=str(exc))
        _record_failure(ctx, stage, worker_id, exc)
        raise
    bound.info("stage.succeeded", seconds=round(time.perf_counter() - started, 3), **_scalars(result))
    return result


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
