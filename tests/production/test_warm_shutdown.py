"""A `kaizen worker` SIGTERMed mid-DPO (a warm shutdown, as systemd's KillMode=mixed or `docker
stop` sends it) saves the trainer's state and hands the stage over; the next worker resumes the
training from the saved step instead of step 0 (workers/graceful_stop.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import StageRun
from tests.production.harness import (
    Processes, assert_lineage_consistent, assert_lineage_exact, production_config, spawn_daemon, spawn_worker, wait_for,
)
from workers.checkpoints import read_manifest

pytestmark = pytest.mark.slow

# Enough steps that the worker is still training when the test sees the first save.
TRAINING = {"training": {"max_steps": 40, "save_steps": 2, "batch_size": 2, "max_length": 128}}


def _saved_steps(state_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in state_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def test_a_worker_sigtermed_mid_dpo_saves_its_state_and_the_next_worker_resumes_from_it(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url, **TRAINING)
    sessions = make_session_factory(make_engine(pg_url))
    state_dir = tmp_path / "data" / "artifacts" / "checkpoints" / ".trainer-state-ckpt-0001"
    first = processes.add(spawn_worker(config, name="worker-1"))
    daemon = processes.add(spawn_daemon(config))

    wait_for(lambda: _saved_steps(state_dir), 300, "dpo_update's first periodic save", interval=0.05)
    os.kill(first.pid, signal.SIGTERM)  # the Celery main process only: a warm shutdown
    assert first.wait(timeout=120) == 0, first.log()[-3000:]
    stopped = next(e for e in first.events() if e.get("event") == "training.stopped_for_shutdown")
    assert 0 < stopped["saved_step"] < 40 and stopped["saved_step"] in _saved_steps(state_dir)
    assert first.has_event("stage.handed_over", stage="dpo_update")

    second = processes.add(spawn_worker(config, name="worker-2"))
    assert daemon.wait(timeout=400) == 0, processes.logs()
    manifest = read_manifest(tmp_path / "data" / "artifacts" / "checkpoints" / "ckpt-0001").metadata
    assert manifest["resumed_from_step"] == stopped["saved_step"]  # the trainer's global_step at resume
    assert second.has_event("training.resumed", from_step=stopped["saved_step"])
    with sessions() as session:
        dpo = session.scalars(select(StageRun).where(StageRun.stage == "dpo_update")).one()
    assert dpo.attempts == 1, "a hand-over is not a failed attempt"
    assert int(dpo.worker_id.split(":")[1]) in second.children()
    assert_lineage_exact(sessions, yaml.safe_load(config.read_text()), tmp_path / "data", iterations=1)
    assert_lineage_consistent(sessions)
    assert not state_dir.exists()
