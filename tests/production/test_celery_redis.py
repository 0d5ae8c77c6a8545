"""Production mode end to end: `kaizen run` + a real `kaizen worker` (Celery) over Redis, lineage in PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

from daemon.bootstrap import initialise
from daemon.config import load_settings
from daemon.cycle import start_or_resume_iteration
from daemon.db.engine import alembic_config, make_engine, make_session_factory
from daemon.db.models import Judgment, Prompt, StageRun, StageStatus
from tests.production.harness import (
    Processes, assert_lineage_exact, lineage_id_of, production_config, spawn_daemon, spawn_worker, stage_row, wait_for,
)
from daemon.stage_runs import stage_input_hash
from daemon.stage_specs import CORE_STAGES

pytestmark = pytest.mark.slow


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_cycle_completes_with_a_daemon_and_one_celery_worker_over_redis_and_postgres(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url)
    worker = processes.add(spawn_worker(config))
    daemon = processes.add(spawn_daemon(config, cycles=1))

    assert daemon.wait(timeout=480) == 0, processes.logs()

    sessions = make_session_factory(make_engine(pg_url))
    with make_engine(pg_url).connect() as conn:  # `kaizen run` migrated the empty database with Alembic
        head = ScriptDirectory.from_config(alembic_config(pg_url)).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    assert_lineage_exact(sessions, yaml.safe_load(config.read_text()), tmp_path / "data", iterations=1)
    with sessions() as session:
        # The tiny model's judge output is garbage: recorded as unparseable, never imputed.
        judgments = list(session.scalars(select(Judgment)))
        assert judgments and all((j.score is None) == (j.parse_error is not None) for j in judgments)
        assert all(r.attempts == 1 for r in session.scalars(select(StageRun)))
    # Every stage ran in the worker, none in the daemon.
    assert sum(e.get("event") == "stage.succeeded" for e in worker.events()) == len(CORE_STAGES)
    assert not daemon.has_event("stage.succeeded")
    # One model-holding process: the pool process loaded torch; the Celery parent that forks it
    # never did, so it cannot have initialised CUDA before the fork.
    pool = worker.children()
    assert len(pool) == 1
    assert "libtorch" in _mapped_libraries(pool[0])
    parent_maps = _mapped_libraries(worker.pid)
    assert "libtorch" not in parent_maps and "libcuda" not in parent_maps


def test_the_same_stage_delivered_twice_to_two_worker_processes_computes_once(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    from workers.celery_app import make_celery, publish_stage

    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url, worker={"lease_seconds": 60})
    settings = load_settings(config)
    sessions = initialise(settings)
    iteration_id, _ = start_or_resume_iteration(sessions, settings)
    with sessions() as session:
        input_hash = stage_input_hash(session, iteration_id, "generate_prompts")
    worker = processes.add(spawn_worker(config, concurrency=2))
    app = make_celery(settings)

    for _ in range(2):
        publish_stage(app, lineage_id_of(sessions), iteration_id, "generate_prompts", input_hash)

    def both_deliveries_finished() -> bool:
        events = [e.get("event") for e in worker.events()]
        return events.count("stage.succeeded") + events.count("stage.already_done") + events.count("stage.delivery_dropped") >= 2

    wait_for(both_deliveries_finished, 240, "both deliveries of generate_prompts to finish", interval=0.5)
    events = [e.get("event") for e in worker.events() if e.get("stage") == "generate_prompts"]
    assert events.count("stage.started") == 1 and events.count("stage.succeeded") == 1
    assert events.count("stage.already_done") == 1  # the second delivery waited on the lease, then got the result
    row = stage_row(sessions, iteration_id, "generate_prompts")
    assert row is not None and row.status == StageStatus.succeeded and row.attempts == 1 and row.input_hash == input_hash
    with sessions() as session:
        prompts = session.scalar(select(func.count()).select_from(Prompt).where(Prompt.iteration_id == iteration_id))
    assert prompts == settings.prompts.per_cycle + settings.gate.heldout_prompts
