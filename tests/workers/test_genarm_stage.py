"""The genarm_train stage on tiny models: it trains an ARM on the iteration's pairs, publishes it
through the artifact store, and resumes a training stopped by a worker shutdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import GenArmStageSettings
from tests.workers.genarm_data import marker_pairs
from workers.checkpoints import verify_checkpoint
from workers.genarm import train_autoregressive_reward_model, trained_arm_beta
from workers.training import PreferenceExample

BETA = 0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _iteration_with_pairs(sessions, examples: list[PreferenceExample]) -> int:
    from daemon.db import lineage
    from daemon.db.engine import transaction
    from daemon.db.models import Iteration, IterationStatus, Pair, Prompt, Response

    with transaction(sessions) as session:
        iteration = Iteration(parent_checkpoint_id=lineage.INITIAL_CHECKPOINT_ID, status=IterationStatus.running)
        session.add(iteration)
        session.flush()
        for example in examples:
            prompt = Prompt(iteration_id=iteration.id, text=example.prompt, role="train", source="seed")
            session.add(prompt)
            session.flush()
            chosen, rejected = (
                Response(iteration_id=iteration.id, prompt_id=prompt.id, kind="policy", sample_index=i, text=text)
                for i, text in enumerate((example.chosen, example.rejected))
            )
            session.add_all([chosen, rejected])
            session.flush()
            session.add(
                Pair(iteration_id=iteration.id, prompt_id=prompt.id, chosen_response_id=chosen.id,
                     rejected_response_id=rejected.id, kind="self_reward", score_gap=2.0)
            )
        return iteration.id


@pytest.mark.slow
def test_the_stage_trains_an_arm_on_the_iterations_pairs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from daemon.bootstrap import initialise
    from tests.factories import small_cycle_settings
    from workers.artifacts import checkpoint_staging_dir
    from workers.genarm import arm_checkpoint_id
    from workers.stages.genarm_train import genarm_train
    from daemon.stage_runs import StageContext

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, training={"min_pairs": 4})
    sessions = initialise(settings)
    examples = marker_pairs("water", "five", n=8)
    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=_iteration_with_pairs(sessions, examples))
    settings.genarm = GenArmStageSettings(enabled=True, beta=BETA, learning_rate=5e-3, max_steps=10, batch_size=4, max_length=96)

    result = genarm_train(ctx).result

    assert result["path"] == str(checkpoint_staging_dir(settings, arm_checkpoint_id(ctx.iteration_id)))
    assert result["pairs"] == 8 and result["base_model_path"] == str(tiny_model_dir)
    assert result["beta"] == BETA and result["steps"] == 10 and not result["reused"]
    assert result["loss_after"] < result["loss_before"]
    assert result["pair_accuracy_after"] > result["pair_accuracy_before"]
    assert verify_checkpoint(result["path"]).metadata["num_pairs"] == 8
    # A redelivered stage finds the finished ARM and trains nothing.
    again = genarm_train(ctx).result
    assert again["reused"] and again["path"] == result["path"] and again["loss_after"] == result["loss_after"]

    too_few = StageContext(settings=settings, sessions=sessions, iteration_id=_iteration_with_pairs(sessions, examples[:3]))
    skipped = genarm_train(too_few).result
    assert "path" not in skipped and skipped["pairs"] == 3 and "min_pairs=4" in skipped["skipped"]


@pytest.mark.slow
def test_under_a_remote_artifacts_url_the_stage_publishes_the_arm(tmp_path: Path, tiny_model_dir: Path) -> None:
    from daemon.bootstrap import initialise
    from tests.factories import small_cycle_settings
    from workers.artifacts import local_checkpoint
    from workers.stages.genarm_train import genarm_train
    from daemon.stage_runs import StageContext

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, artifacts_url=f"memory://genarm-{tmp_path.name}")
    sessions = initialise(settings)
    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=_iteration_with_pairs(sessions, marker_pairs("water", "five", n=4)))

    settings.genarm = GenArmStageSettings(enabled=True, beta=BETA, learning_rate=5e-3, max_steps=2, batch_size=4, max_length=96)
    result = genarm_train(ctx).result

    assert result["path"].startswith(settings.artifacts_url + "/")
    fetched = local_checkpoint(settings, result["path"])  # downloaded and verified against its manifest
    assert trained_arm_beta(fetched) == BETA


def test_a_shutdown_request_saves_the_arm_trainer_state_and_the_next_attempt_resumes_only_the_remaining_steps(
    tiny_model_dir: Path, tmp_path: Path, stop_listener
) -> None:
    """The stop signal arrives during step 3 (the periodic save is every 100 steps): the trainer
    saves step 3 at once and hands the stage over; nothing is committed. The next attempt
    resumes at step 3, trains only steps 4-8, and ends with exactly the losses of an
    uninterrupted run (full fine-tune, so no random adapter init: weights, optimizer, batch
    order and RNG all come back from the save)."""
    import os

    from daemon.stage_runs import StageInterrupted
    from workers.checkpoints import read_manifest
    from workers.graceful_stop import listen_for_stop_requests
    from workers.trainer_state import trainer_state_dir

    settings = GenArmStageSettings(beta=BETA, learning_rate=5e-3, max_steps=8, batch_size=4, lora_r=0, max_length=96, save_steps=100)
    pairs = marker_pairs("water", "five", n=6)
    out = tmp_path / "checkpoints" / "arm-0001"

    def shutdown_during_step_3(entry: dict) -> None:
        if entry["step"] == 3:
            os.kill(os.getpid(), stop_listener)

    with pytest.raises(StageInterrupted, match="stopped at step 3 of 8"):
        train_autoregressive_reward_model(str(tiny_model_dir), pairs, out, settings, log_callback=shutdown_during_step_3)
    assert not out.exists()
    assert [p.name for p in trainer_state_dir(out).iterdir()] == ["checkpoint-3"]  # the shutdown's save, nothing else

    listen_for_stop_requests()  # the next worker's pool process
    steps: list[int] = []
    resumed = train_autoregressive_reward_model(str(tiny_model_dir), pairs, out, settings, log_callback=lambda e: steps.append(e["step"]))
    assert resumed.resumed_from_step == 3 and read_manifest(out).metadata["resumed_from_step"] == 3
    assert steps == [4, 5, 6, 7, 8]  # steps 1-3 were not trained again
    assert resumed.steps == 8 and not trainer_state_dir(out).exists()  # committed: the saved state is not needed

    uninterrupted = train_autoregressive_reward_model(str(tiny_model_dir), pairs, tmp_path / "straight", settings)
    assert uninterrupted.resumed_from_step == 0
    assert resumed.loss_history == pytest.approx(uninterrupted.loss_history, abs=1e-6)
    assert resumed.loss_after == pytest.approx(uninterrupted.loss_after, abs=1e-6)


@pytest.mark.slow
def test_a_genarm_stage_stopped_by_a_shutdown_is_resumed_from_the_remote_store_on_another_machine(
    tmp_path: Path, tiny_model_dir: Path, stop_listener
) -> None:
    """Under a remote artifacts_url: a stop request that came before training saves step 1 and
    hands the stage over; the save is in the store beside the ARM-to-be, and an attempt with no
    local state (another machine) downloads it and resumes from step 1 (in the stage result and
    the ARM's manifest, periodic saves every 2 steps replacing it); the commit clears the store."""
    import os
    import shutil

    import fsspec

    from daemon.bootstrap import initialise
    from daemon.stage_runs import StageContext, StageInterrupted
    from tests.factories import small_cycle_settings
    from workers.artifacts import checkpoint_staging_dir, local_checkpoint
    from workers.checkpoints import read_manifest
    from workers.genarm import arm_checkpoint_id
    from workers.graceful_stop import listen_for_stop_requests
    from workers.stages.genarm_train import genarm_train
    from workers.trainer_state import SAVE_MARKER, remote_trainer_state, trainer_state_dir

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, artifacts_url=f"memory://genarm-resume-{tmp_path.name}")
    sessions = initialise(settings)
    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=_iteration_with_pairs(sessions, marker_pairs("water", "five", n=4)))
    settings.genarm = GenArmStageSettings(enabled=True, beta=BETA, learning_rate=5e-3, max_steps=6, batch_size=4, max_length=96, save_steps=2)
    arm_id = arm_checkpoint_id(ctx.iteration_id)
    store = remote_trainer_state(settings, arm_id)
    assert store is not None
    fs, root = fsspec.core.url_to_fs(store.uri)

    os.kill(os.getpid(), stop_listener)  # the worker is asked to stop while the stage loads its models
    with pytest.raises(StageInterrupted, match="stopped at step 1 of 6"):
        genarm_train(ctx)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == ["checkpoint-1"]
    assert fs.exists(f"{root}/checkpoint-1/{SAVE_MARKER}")

    listen_for_stop_requests()
    shutil.rmtree(trainer_state_dir(checkpoint_staging_dir(settings, arm_id)))  # another machine: no local save
    result = genarm_train(ctx).result
    assert result["resumed_from_step"] == 1 and result["steps"] == 6
    assert read_manifest(local_checkpoint(settings, result["path"])).metadata["resumed_from_step"] == 1
    assert not fs.exists(root)  # committed: the saved state is removed from the store too
