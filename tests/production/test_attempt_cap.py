"""An always-crashing dpo_update (its pool process SIGKILLed on every attempt, like an OOM) is
bounded by worker.max_stage_attempts, and its parked iteration never gets a candidate afterwards.

Celery requeues the dead pool process's message (``task_reject_on_worker_lost``) and the daemon
sends the stage again when its lease expires; each delivery that takes the stage over counts one
attempt in the lineage DB. The delivery after the cap fails the stage and its iteration for good
(a ``stage_gave_up`` event) and every later one is acknowledged and dropped, including one that
reaches a healthy worker after the crashing has stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.config import load_settings
from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import Checkpoint, Event, Iteration, IterationStatus, StageStatus
from tests.production.harness import (
    Processes, assert_lineage_consistent, lineage_id_of, production_config, spawn_daemon, spawn_python, spawn_worker, stage_row, wait_for,
)
from daemon.stage_runs import GAVE_UP_EVENT

pytestmark = pytest.mark.slow

CAP = 3


def test_an_always_crashing_dpo_update_is_bounded_by_the_attempt_cap_and_never_yields_a_candidate(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    config = production_config(
        tmp_path, tiny_model_dir, pg_url, redis_url, worker={"max_stage_attempts": CAP}, schedule={"max_consecutive_failures": 1}
    )
    crashing = processes.add(spawn_python(
        "crashing-worker",
        ["-m", "celery", "-A", "tests.production.crashing_worker:app", "worker", "--queues", "gpu,cpu", "--concurrency", "1",
         "--loglevel", "warning", "--without-gossip", "--without-mingle", "--hostname", "crashing@%h"],
        tmp_path, env={"KAIZEN_CONFIG": str(config), "KAIZEN_TEST_CRASH_STAGE": "dpo_update"},
    ))
    daemon = processes.add(spawn_daemon(config))
    assert daemon.wait(timeout=420) == 1, daemon.log()[-3000:]  # max_consecutive_failures: 1 -> it gives up
    sessions = make_session_factory(make_engine(pg_url))

    row = stage_row(sessions, 1, "dpo_update")
    assert row is not None and row.status == StageStatus.failed and row.attempts == CAP, (row and (row.status, row.attempts))
    assert "failed for good" in (row.error or "")
    with sessions() as session:
        iteration = session.get(Iteration, 1)
        assert iteration.status == IterationStatus.failed
        assert [e.iteration_id for e in session.scalars(select(Event).where(Event.kind == GAVE_UP_EVENT))] == [1]
    assert crashing.has_event("stage.gave_up", stage="dpo_update")
    crashing.kill9()

    # The crashing stops; a redelivery of the parked iteration's dpo_update reaches a healthy worker.
    from workers.celery_app import make_celery, publish_stage

    healthy = processes.add(spawn_worker(config, name="healthy-worker"))
    publish_stage(make_celery(load_settings(config)), lineage_id_of(sessions), 1, "dpo_update", row.input_hash)
    wait_for(lambda: healthy.has_event("stage.delivery_dropped", iteration_id=1, stage="dpo_update"), 120,
             "the healthy worker to drop the parked iteration's dpo_update", interval=0.5)
    assert not healthy.has_event("stage.started", stage="dpo_update")
    with sessions() as session:
        assert list(session.scalars(select(Checkpoint.id))) == ["ckpt-0000"]  # no un-gated candidate
    after = stage_row(sessions, 1, "dpo_update")
    assert after is not None and after.attempts == CAP and after.status == StageStatus.failed
    assert_lineage_consistent(sessions)
