"""Two lineages (two SQLite lineage DBs), each with its own daemon and `kaizen worker`, share ONE
Redis DB. Each lineage's stages go to queues named after its uuid (workers/lineage_queues.py),
so neither worker ever takes (or drops) the other's messages; a message that reaches the wrong
worker anyway is refused and sent on to its own lineage's queue, never claimed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.config import load_settings
from daemon.cycle import start_or_resume_iteration
from daemon.db.models import StageRun
from daemon.stage_runs import stage_input_hash
from tests.production.harness import (
    KaizenProcess, Processes, assert_lineage_consistent, assert_lineage_exact, lineage_id_of, production_config, spawn_daemon,
    spawn_worker, wait_for,
)

pytestmark = pytest.mark.slow

LINEAGES = ("a", "b")


def _lineage(tmp_path: Path, name: str, model_dir: Path, broker_url: str):  # type: ignore[no-untyped-def]
    """Config and migrated lineage DB of lineage ``name``, before any worker or daemon starts."""
    root = tmp_path / name
    root.mkdir()
    config = production_config(root, model_dir, f"sqlite:///{root / 'lineage.db'}", broker_url)
    return config, initialise(load_settings(config))


def _ready(worker: KaizenProcess) -> bool:
    # Celery's own "ready." line: the worker consumes from its queues from here on.
    return worker.has_event("worker.lineage") and " ready." in worker.log()


def _stage_pids(sessions) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The pid (host:pid:suffix) of the process that ran each stage, as its stage row records it."""
    with sessions() as session:
        rows = session.scalars(select(StageRun).where(StageRun.worker_id.is_not(None)))
        return {row.stage: int(row.worker_id.split(":")[1]) for row in rows}


def test_two_lineages_on_one_redis_db_each_run_only_their_own_stages(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, processes: Processes
) -> None:
    lineages = {name: _lineage(tmp_path, name, tiny_model_dir, redis_url) for name in LINEAGES}
    ids = {name: lineage_id_of(sessions) for name, (_, sessions) in lineages.items()}
    assert ids["a"] != ids["b"]
    workers = {name: processes.add(spawn_worker(config, name=f"worker-{name}")) for name, (config, _) in lineages.items()}
    for worker in workers.values():
        wait_for(lambda w=worker: _ready(w), 120, f"{worker.name} to consume its queues", interval=0.2)
    daemons = {name: processes.add(spawn_daemon(config, name=f"daemon-{name}")) for name, (config, _) in lineages.items()}

    for name, daemon in daemons.items():
        assert daemon.wait(timeout=480) == 0, processes.logs()
    for name, (config, sessions) in lineages.items():
        assert_lineage_exact(sessions, yaml.safe_load(config.read_text()), config.parent / "data", iterations=1)
        assert_lineage_consistent(sessions)
        with sessions() as session:
            assert all(row.attempts == 1 for row in session.scalars(select(StageRun)))  # nothing dropped, nothing redone
        own_pool = set(workers[name].children())
        assert set(_stage_pids(sessions).values()) <= own_pool, (name, _stage_pids(sessions), own_pool)
        assert workers[name].has_event("worker.lineage", lineage_id=ids[name])
    for worker in workers.values():
        assert not worker.has_event("stage.delivery_dropped") and not worker.has_event("stage.foreign_lineage"), worker.log()[-3000:]


def test_a_stage_of_another_lineage_is_refused_and_sent_on_to_its_owner(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, processes: Processes
) -> None:
    from workers.celery_app import TASK_NAME, make_celery
    from workers.lineage_queues import lineage_queue

    lineages = {name: _lineage(tmp_path, name, tiny_model_dir, redis_url) for name in LINEAGES}
    ids = {name: lineage_id_of(sessions) for name, (_, sessions) in lineages.items()}
    workers = {name: processes.add(spawn_worker(config, name=f"worker-{name}")) for name, (config, _) in lineages.items()}
    for worker in workers.values():
        wait_for(lambda w=worker: _ready(w), 120, f"{worker.name} to consume its queues", interval=0.2)

    # Lineage a's first stage, misrouted onto lineage b's queue.
    settings_a, sessions_a = load_settings(lineages["a"][0]), lineages["a"][1]
    iteration_id, _ = start_or_resume_iteration(sessions_a, settings_a)
    with sessions_a() as session:
        input_hash = stage_input_hash(session, iteration_id, "generate_prompts")
    make_celery(settings_a).send_task(
        TASK_NAME, args=[iteration_id, "generate_prompts", input_hash], kwargs={"lineage_id": ids["a"]},
        queue=lineage_queue(ids["b"], "gpu"),
    )
    wait_for(lambda: workers["b"].has_event("stage.foreign_lineage"), 60, "worker b to refuse it", interval=0.2)
    refusal = next(e for e in workers["b"].events() if e.get("event") == "stage.foreign_lineage")
    assert refusal["forwarded_to"] == lineage_queue(ids["a"], "gpu") and ids["a"] in refusal["reason"]
    # Lineage a's worker gets it from its own queue and runs it; worker b never claimed anything.
    wait_for(lambda: workers["a"].has_event("stage.succeeded", stage="generate_prompts"), 120, "worker a to run it", interval=0.2)
    assert not workers["b"].has_event("stage.started")
    assert set(_stage_pids(sessions_a).values()) <= set(workers["a"].children()) and "generate_prompts" in _stage_pids(sessions_a)
    with lineages["b"][1]() as session:
        assert session.scalars(select(StageRun)).all() == []
