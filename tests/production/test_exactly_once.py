"""Exactly-once stage effects over at-least-once delivery, on the real PostgreSQL (row locks) and
on SQLite (the embedded default: BEGIN IMMEDIATE serialises the claims).

The stage functions here are tiny counting stand-ins (no model): what is under test is the
claim / lease / fenced-commit protocol of daemon/stage_runner.py.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from daemon.config import load_settings
from daemon.cycle import start_or_resume_iteration
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Iteration, IterationStatus, Prompt, StageRun, StageStatus, utcnow
from daemon.stage_runner import execute_stage
from daemon.stage_runs import (
    LeaseLost, StageContext, StageHeldElsewhere, StageInputMismatch, StageInterrupted, StageNotReady, StageOutput, StaleStageMessage,
    stage_input_hash,
)


class CountingStage:
    """Writes one prompt row per computation and counts how often it computed."""

    def __init__(self, seconds: float = 0.0, during: object = None) -> None:
        self.seconds = seconds
        self.during = during
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, ctx: StageContext) -> StageOutput:
        with self._lock:
            self.calls += 1
            call = self.calls
        if callable(self.during):
            self.during(ctx)
        time.sleep(self.seconds)

        def write(session):  # type: ignore[no-untyped-def]
            session.add(Prompt(iteration_id=ctx.iteration_id, text=f"computed {call}", role="train", source="seed"))
            return {}

        return StageOutput({"call": call}, write)


@pytest.fixture(params=["postgresql", "sqlite"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> StageContext:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        sessions = request.getfixturevalue("pg_sessions")
    else:
        url = f"sqlite:///{tmp_path / 'lineage.db'}"
        sessions = make_session_factory(make_engine(url))
    settings = load_settings(None, data_dir=tmp_path / "data", database_url=url, worker={"mode": "eager", "lease_seconds": 1.0})
    upgrade_to_head(url)
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path=str(tmp_path / "model"), base_model="tiny", actor="test")
    iteration_id, _ = start_or_resume_iteration(sessions, settings)
    return StageContext(settings=settings, sessions=sessions, iteration_id=iteration_id)


def _prompts(ctx: StageContext) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(Prompt).where(Prompt.iteration_id == ctx.iteration_id)) or 0


def _row(ctx: StageContext, stage: str = "generate_prompts") -> StageRun:
    with ctx.sessions() as session:
        return session.scalars(select(StageRun).where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == stage)).one()


def _deliver_concurrently(ctx: StageContext, stage_fn: CountingStage, deliveries: int = 2) -> list[object]:
    outcomes: list[object] = [None] * deliveries
    barrier = threading.Barrier(deliveries)

    def deliver(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = execute_stage(ctx, "generate_prompts", stage_fn)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[index] = exc

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(deliveries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_the_same_task_delivered_twice_at_once_computes_once_and_both_get_the_result(ctx: StageContext) -> None:
    stage = CountingStage(seconds=0.5)
    ctx.settings.worker.lease_seconds = 2.0  # the second delivery waits out the first's computation

    outcomes = _deliver_concurrently(ctx, stage)

    assert stage.calls == 1
    assert outcomes == [{"call": 1}, {"call": 1}]
    assert _prompts(ctx) == 1
    row = _row(ctx)
    assert row.status == StageStatus.succeeded and row.attempts == 1


def test_a_live_holder_keeps_its_lease_by_heartbeat_and_a_duplicate_leaves_the_stage_to_it(ctx: StageContext) -> None:
    # The computation outlasts the 1 s lease three times over: only the heartbeat keeps it.
    stage = CountingStage(seconds=3.0)

    outcomes = _deliver_concurrently(ctx, stage)

    assert stage.calls == 1
    held = [o for o in outcomes if isinstance(o, StageHeldElsewhere)]
    assert len(held) == 1 and "is being computed by" in str(held[0])
    assert {"call": 1} in outcomes
    assert _prompts(ctx) == 1
    assert _row(ctx).attempts == 1


def test_a_redelivery_after_the_worker_died_takes_over_the_expired_lease_and_reruns(ctx: StageContext) -> None:
    # What a worker killed mid-stage leaves behind: a running row whose lease is no longer renewed.
    with transaction(ctx.sessions) as session:
        session.execute(
            update(StageRun)
            .where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "generate_prompts")
            .values(status=StageStatus.running, attempts=1, worker_id="gone-host:4242:deadbeef",
                    lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    stage = CountingStage()

    assert execute_stage(ctx, "generate_prompts", stage) == {"call": 1}

    row = _row(ctx)
    assert stage.calls == 1 and row.status == StageStatus.succeeded
    assert row.attempts == 2 and row.worker_id != "gone-host:4242:deadbeef"
    assert _prompts(ctx) == 1


def test_a_stage_interrupted_by_a_worker_shutdown_is_handed_over_uncounted_and_the_next_delivery_runs_it(ctx: StageContext) -> None:
    def interrupted(_ctx: StageContext) -> StageOutput:
        raise StageInterrupted("stopped at step 4 of 8 for a worker shutdown")

    with pytest.raises(StageInterrupted):
        execute_stage(ctx, "generate_prompts", interrupted)

    row = _row(ctx)
    assert row.status == StageStatus.pending and row.attempts == 0 and row.lease_expires_at is None
    assert "handed over" in (row.error or "") and _prompts(ctx) == 0
    stage = CountingStage()
    assert execute_stage(ctx, "generate_prompts", stage) == {"call": 1}  # at once: no lease to wait out
    row = _row(ctx)
    assert row.status == StageStatus.succeeded and row.attempts == 1 and row.error is None


def test_a_worker_whose_lease_was_taken_over_discards_its_result(ctx: StageContext) -> None:
    def taken_over(ctx: StageContext) -> None:
        with transaction(ctx.sessions) as session:
            session.execute(
                update(StageRun)
                .where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "generate_prompts")
                .values(worker_id="other-host:1:cafe", lease_expires_at=utcnow() + timedelta(seconds=60))
            )

    with pytest.raises(LeaseLost, match="other-host:1:cafe"):
        execute_stage(ctx, "generate_prompts", CountingStage(during=taken_over))

    assert _prompts(ctx) == 0
    row = _row(ctx)
    assert row.status == StageStatus.running and row.worker_id == "other-host:1:cafe"


def test_results_are_keyed_by_the_input_hash(ctx: StageContext) -> None:
    with pytest.raises(StageNotReady, match="needs generate_prompts"):
        execute_stage(ctx, "respond", CountingStage())
    execute_stage(ctx, "generate_prompts", CountingStage())
    with ctx.sessions() as session:
        respond_hash = stage_input_hash(session, ctx.iteration_id, "respond")
    with pytest.raises(StaleStageMessage, match="the message was sent for inputs"):
        execute_stage(ctx, "respond", CountingStage(), expected_input_hash="0" * 64)

    assert execute_stage(ctx, "respond", CountingStage(), expected_input_hash=respond_hash) == {"call": 1}
    assert _row(ctx, "respond").input_hash == respond_hash

    # An upstream result changed behind the stage's back: the stored result no longer answers.
    with transaction(ctx.sessions) as session:
        session.execute(
            update(StageRun)
            .where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "generate_prompts")
            .values(result={"call": 99})
        )
    with pytest.raises(StageInputMismatch, match="computed from inputs"):
        execute_stage(ctx, "respond", CountingStage())


def test_concurrent_cycle_starts_never_create_two_running_iterations(ctx: StageContext) -> None:
    for _ in range(4):
        with transaction(ctx.sessions) as session:
            session.execute(update(Iteration).values(status=IterationStatus.completed))
        results: list[tuple[int, bool]] = []
        barrier = threading.Barrier(3)

        def start() -> None:
            barrier.wait()
            results.append(start_or_resume_iteration(ctx.sessions, ctx.settings))

        threads = [threading.Thread(target=start) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len({iteration_id for iteration_id, _ in results}) == 1
        assert sorted(resumed for _, resumed in results) == [False, True, True]
        with ctx.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Iteration).where(Iteration.status == IterationStatus.running)) == 1
