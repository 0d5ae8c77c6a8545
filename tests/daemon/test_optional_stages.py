"""The optional steerlm_sft and genarm_train stages run inside a cycle when enabled."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.cycle import run_cycle
from daemon.db.models import Checkpoint, StageRun, StageStatus
from daemon.dispatch import EagerDispatcher
from workers.steering.genarm import latest_loop_reward_model
from tests.factories import small_cycle_settings
from workers.checkpoints import verify_checkpoint
from daemon.stage_specs import STAGE_ORDER, stages_for

pytestmark = pytest.mark.slow


def test_disabled_optional_stages_are_not_part_of_an_iteration(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir)
    assert stages_for(settings) == ("generate_prompts", "respond", "judge", "build_pairs", "dpo_update", "evaluate_gate", "evaluate_suites")


def test_enabled_stages_run_in_order_and_the_reward_model_is_served_as_loop(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        steerlm={"enabled": True, "max_steps": 2, "judge_samples": 1, "judge_max_new_tokens": 16},
        genarm={"enabled": True, "max_steps": 2, "batch_size": 2, "max_length": 128},
    )
    assert stages_for(settings) == STAGE_ORDER
    sessions = initialise(settings)
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))

    with sessions() as session:
        rows = {r.stage: r for r in session.scalars(select(StageRun).where(StageRun.iteration_id == report.iteration_id))}
        assert set(rows) == set(STAGE_ORDER)
        assert all(r.status == StageStatus.succeeded for r in rows.values())
        order = sorted(rows.values(), key=lambda r: r.finished_at)
        assert [r.stage for r in order] == list(STAGE_ORDER)
        arm_path = rows["genarm_train"].result["path"]
        verify_checkpoint(arm_path)
        assert latest_loop_reward_model(session) == arm_path
        # The random tiny judge cannot label attributes, so the SFT is skipped with its reason and
        # DPO starts from the champion; with labels it would start from the SteerLM checkpoint.
        assert "fewer than min_examples" in rows["steerlm_sft"].result["skipped"]
        candidate = session.get(Checkpoint, f"ckpt-{report.iteration_id:04d}")
        assert candidate is not None and candidate.parent_id == "ckpt-0000"
