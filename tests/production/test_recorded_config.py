"""An external worker computes with the config its iteration recorded, not with its own yaml.

The daemon and the worker share one lineage DB and one embedded (SQLite) broker but read
different kaizen.yaml files: the worker's disagrees on every training value tested here and sets
its own machine-local keys (data dir, artifacts, threads, logging). The lineage must show the
daemon's (recorded) training values and the worker's local keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from daemon.config import embedded_broker_url, load_settings
from daemon.db.engine import open_lineage
from daemon.db.models import Iteration, Prompt, Response, StageRun
from tests.factories import small_cycle_config
from tests.production.harness import Processes, spawn, spawn_worker

pytestmark = pytest.mark.slow


def _write(path: Path, config: dict) -> Path:
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_external_worker_with_another_yaml_computes_with_the_recorded_config(
    tmp_path: Path, tiny_model_dir: Path, processes: Processes
) -> None:
    shared = {
        "database_url": f"sqlite:///{tmp_path / 'lineage.db'}",
        "log_format": "json",
        "worker": {"mode": "external", "broker_url": embedded_broker_url(str(tmp_path / "broker.db")), "lease_seconds": 10},
    }
    daemon_config = small_cycle_config(
        tmp_path / "daemon-data", tiny_model_dir, **shared, seed=3,
        prompts={"per_cycle": 3}, respond={"num_samples": 2}, training={"max_steps": 2},
        schedule={"interval_seconds": 1, "max_consecutive_failures": 1},
    )
    worker_config = small_cycle_config(
        tmp_path / "worker-data", tiny_model_dir, **shared, seed=11, artifacts_url=str(tmp_path / "worker-artifacts"),
        prompts={"per_cycle": 5}, respond={"num_samples": 3}, training={"max_steps": 1}, model={"cpu_threads": 1},
    )
    daemon_yaml = _write(tmp_path / "daemon" / "kaizen.yaml", daemon_config)
    worker_yaml = _write(tmp_path / "worker" / "kaizen.yaml", worker_config)

    init = processes.add(spawn("init", ["init", "--config", str(daemon_yaml)], daemon_yaml.parent))
    assert init.wait(timeout=180) == 0, init.log()[-3000:]
    worker = processes.add(spawn_worker(worker_yaml))
    daemon = processes.add(spawn("daemon", ["run", "--config", str(daemon_yaml), "--cycles", "1"], daemon_yaml.parent))
    assert daemon.wait(timeout=420) == 0, processes.logs()

    sessions = open_lineage(load_settings(daemon_yaml))
    with sessions() as session:
        iteration = session.scalars(select(Iteration)).one()
        assert iteration.config_snapshot["respond"]["num_samples"] == 2
        stages = {row.stage: row for row in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration.id))}
        assert all(row.status.value == "succeeded" for row in stages.values()), {s: r.error for s, r in stages.items()}
        # Training values come from the recorded config: 3 prompts, 2 answers each, 2 DPO steps, seed 3.
        train_prompts = session.scalar(select(func.count()).select_from(Prompt).where(Prompt.iteration_id == iteration.id, Prompt.role == "train"))
        assert train_prompts == 3
        per_prompt = session.execute(
            select(Response.prompt_id, func.count()).where(Response.iteration_id == iteration.id, Response.kind == "policy").group_by(Response.prompt_id)
        ).all()
        assert per_prompt and {count for _, count in per_prompt} == {2}
        dpo = stages["dpo_update"].result
        assert "skipped" not in dpo, dpo
        assert dpo["steps"] == 2
        # Machine-local keys come from the worker: its artifacts store holds what the stages wrote.
        assert dpo["dataset"].startswith(str(tmp_path / "worker-artifacts"))
        assert iteration.candidate_checkpoint_id is not None
    # The stages ran in the worker process.
    assert sum(e.get("event") == "stage.succeeded" for e in worker.events()) == len(stages)
