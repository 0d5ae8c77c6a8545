"""DPO update (TRL DPOTrainer + LoRA) on the tiny model: it learns the preference and commits atomically."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from workers import lora_training
from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint
from workers.tiny_model import build_tiny_model
from daemon.config import TrainingSettings
from workers.training import PreferenceExample, dpo_update, preference_margin, trl_records, unfinished_aware_trainer, without_end_marker

PROMPTS = [
    "Write a short poem about the sea.",
    "Describe the water cycle.",
    "Give three tips for learning a new language.",
    "Explain how photosynthesis works in simple terms.",
    "Summarize the plot of a detective story.",
    "What is the difference between a list and a tuple in Python?",
    "Answer the question helpfully and honestly.",
    "Be concise, accurate and polite.",
]
CHOSEN = "Here is an answer: the result is computed step by step, then checked once more."
REJECTED = "Score: 1 2 3 4 5 points."
EXAMPLES = [PreferenceExample(p, CHOSEN, REJECTED) for p in PROMPTS]
STEPS = 32
SETTINGS = TrainingSettings(learning_rate=1e-3, max_steps=STEPS, batch_size=2)


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory):
    """One DPO update of the base, with a spy on the DPOTrainer that TRL builds."""
    seen: dict = {}
    logs: list[dict] = []
    base_files = _digests(base_dir)
    margin_before = preference_margin(str(base_dir), EXAMPLES)

    import trl
    from peft import PeftModel

    class SpyTrainer(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["ref_model"] = self.ref_model
            seen["policy_is_peft"] = isinstance(self.model, PeftModel)
            seen["trainable"] = [n for n, p in self.model.named_parameters() if p.requires_grad]

    mp = pytest.MonkeyPatch()
    mp.setattr(trl, "DPOTrainer", SpyTrainer)  # dpo_update imports it from trl at call time
    try:
        out = tmp_path_factory.mktemp("cycle") / "candidate"
        result = dpo_update(str(base_dir), EXAMPLES, out, SETTINGS, log_callback=logs.append)
    finally:
        mp.undo()
    return {
        "result": result,
        "out": out,
        "seen": seen,
        "logs": logs,
        "base_files": base_files,
        "margin_before": margin_before,
    }


def test_dpo_raises_the_preference_margin(run):
    result = run["result"]
    margin_after = preference_margin(result.checkpoint_path, EXAMPLES)
    # ~ -19 nats before; 32 steps at lr 1e-3 move it by ~8 nats. Require a clear gain.
    assert margin_after > run["margin_before"] + 3.0, (run["margin_before"], margin_after)


def test_checkpoint_is_complete_merged_and_has_the_adapter(run, base_dir):
    result = run["result"]
    assert result.checkpoint_path == str(run["out"])
    manifest = verify_checkpoint(result.checkpoint_path)
    listed = {f.path for f in manifest.files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= listed
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= listed
    assert Path(result.adapter_path) == run["out"] / "adapter"
    assert not [p for p in listed if p.endswith((".bin", ".pt"))]
    assert not [p for p in run["out"].parent.iterdir() if p.name.startswith(".tmp-")]

    meta = manifest.metadata
    assert meta["parent"] == str(base_dir)
    assert meta["reference"] == "adapter_disabled_parent"
    assert meta["settings"]["max_steps"] == STEPS and meta["settings"]["learning_rate"] == 1e-3
    assert meta["metrics"] == result.metrics
    # The manifest records the adapter kept beside the merged weights, and what it was trained on.
    assert meta["adapter"] == {"path": "adapter", "rank": SETTINGS.lora_r}
    record = lora_training.checkpoint_adapter(result.checkpoint_path)
    assert record == lora_training.AdapterRecord(run["out"] / "adapter", str(base_dir), SETTINGS.lora_r)
    assert lora_training.checkpoint_adapter(base_dir) is None  # the tiny base: a checkpoint with no adapter

    # The merged model is a plain model (no LoRA layers) and equals base + adapter applied by PEFT.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.checkpoint_path, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, result.adapter_path).eval()
    ids = torch.tensor([[3, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-4)


def test_a_corrupted_adapter_fails_the_checkpoints_verification(run, tmp_path):
    import shutil

    copy = tmp_path / "candidate"
    shutil.copytree(run["out"], copy)
    verify_checkpoint(copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch for adapter/adapter_model.safetensors"):
        verify_checkpoint(copy)


def test_base_model_files_untouched(run, base_dir):
    assert _digests(base_dir) == run["base_files"]


def test_reference_is_the_adapter_disabled_base(run):
    seen = run["seen"]
    # No second model: TRL keeps ref_model=None and disables the adapter for the reference pass.
    assert seen["ref_model"] is None
    assert seen["policy_is_peft"]
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    # LoRA B starts at zero, so on the first batch policy == reference exactly: every implicit reward is 0.
    first = next(e for e in run["result"].log_history if "rewards/chosen" in e)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)


def test_metrics_and_logs(run):
    result = run["result"]
    steps = [e for e in result.log_history if "rewards/margins" in e]
    assert len(steps) == STEPS  # logging_steps=1
    assert len(run["logs"]) >= STEPS and run["logs"][0]["step"] == 1
    m = result.metrics
    for key in ("loss", "train_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert math.isfinite(m[key]), key
    assert m["steps"] == STEPS
    assert m["loss"] < math.log(2)
    assert m["final_rewards/margins"] > 0 and m["final_rewards/accuracies"] > 0.5
    assert m["rewards/chosen"] > m["rewards/rejected"]
    assert result.train_seconds > 0


def test_rerun_returns_the_committed_checkpoint(run, base_dir, tmp_path):
    again = dpo_update(str(base_dir), EXAMPLES, run["out"], SETTINGS)
    assert again.reused and again.checkpoint_path == run["result"].checkpoint_path
    assert again.metrics == run["result"].metrics
    with pytest.raises(CheckpointError, match="different checkpoint"):
        dpo_update(str(tmp_path / "another-parent"), EXAMPLES, run["out"], SETTINGS)


def test_explicit_reference_model_and_failed_reload_check(base_dir, tmp_path, monkeypatch):
    # A different model as KL anchor: the policy starts away from it, so first-step rewards are not 0.
    anchor = build_tiny_model(tmp_path / "anchor", seed=1)
    quick = TrainingSettings(max_steps=1, batch_size=2)
    result = dpo_update(str(base_dir), EXAMPLES[:2], tmp_path / "anchored", quick, reference_model_path=str(anchor))
    assert read_manifest(result.checkpoint_path).metadata["reference"] == str(anchor)
    first = next(e for e in result.log_history if "rewards/chosen" in e)
    assert first["rewards/chosen"] != 0.0

    # If the reloaded model does not reproduce the in-memory one, nothing is committed.
    real_probe = lora_training.probe_logits
    calls = []

    def drifting_probe(model, tokenizer):
        calls.append(1)
        logits = real_probe(model, tokenizer)
        return logits + (1e-2 if len(calls) == 2 else 0.0)

    monkeypatch.setattr(lora_training, "probe_logits", drifting_probe)
    out = tmp_path / "bad"
    with pytest.raises(CheckpointError, match="does not reproduce"):
        dpo_update(str(base_dir), EXAMPLES[:2], out, quick)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_an_interrupted_dpo_update_resumes_from_its_last_saved_step(base_dir, tmp_path) -> None:
    """A worker dies mid-training (here: an exception out of the trainer's log callback at step 5,
    after the state of step 4 was saved); the next attempt resumes at step 4, not at step 0."""
    from workers.lora_training import trainer_state_dir

    settings = SETTINGS.model_copy(update={"max_steps": 8, "save_steps": 2})
    out = tmp_path / "checkpoints" / "ckpt-0001"

    def dies_at_step_5(entry: dict) -> None:
        if entry.get("step") == 5 and "loss" in entry:
            raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError, match="worker killed"):
        dpo_update(str(base_dir), EXAMPLES, out, settings, log_callback=dies_at_step_5)
    assert not out.exists()
    assert (trainer_state_dir(out) / "checkpoint-4").is_dir()

    steps: list[int] = []
    result = dpo_update(str(base_dir), EXAMPLES, out, settings, log_callback=lambda e: steps.append(e["step"]))
    meta = read_manifest(result.checkpoint_path).metadata
    assert meta["resumed_from_step"] == 4  # the trainer's global_step at resume
    assert min(steps) == 5 and max(steps) == 8  # steps 1-4 were not trained again
    assert not trainer_state_dir(out).exists()  # the committed checkpoint makes the state unneeded


def test_a_shutdown_request_saves_the_trainer_state_at_once_and_hands_the_stage_over(base_dir, tmp_path, stop_listener) -> None:
    """The stop signal arrives while step 3 is logged (the periodic save is every 100 steps): the
    trainer saves at the end of the next step, 4, and stops; nothing is committed, and the next
    attempt resumes at step 4."""
    import os

    from daemon.stage_runs import StageInterrupted
    from workers.graceful_stop import listen_for_stop_requests
    from workers.lora_training import trainer_state_dir

    settings = SETTINGS.model_copy(update={"max_steps": 8, "save_steps": 100})
    out = tmp_path / "checkpoints" / "ckpt-0001"

    def shutdown_at_step_3(entry: dict) -> None:
        if entry.get("step") == 3 and "loss" in entry:
            os.kill(os.getpid(), stop_listener)

    with pytest.raises(StageInterrupted, match="stopped at step 4 of 8"):
        dpo_update(str(base_dir), EXAMPLES, out, settings, log_callback=shutdown_at_step_3)
    assert not out.exists()
    assert [p.name for p in trainer_state_dir(out).glob("checkpoint-*")] == ["checkpoint-4"]  # the shutdown's save, no other

    listen_for_stop_requests()  # the next worker's pool process
    steps: list[int] = []
    result = dpo_update(str(base_dir), EXAMPLES, out, settings, log_callback=lambda e: steps.append(e["step"]))
    assert read_manifest(result.checkpoint_path).metadata["resumed_from_step"] == 4
    assert min(steps) == 5 and max(steps) == 8  # steps 1-4 were not trained again


def test_a_save_in_a_remote_artifact_store_is_resumed_by_a_worker_on_another_machine(base_dir, tmp_path, stop_listener) -> None:
    """Under a remote artifacts_url each save is uploaded beside the checkpoint-to-be (marker
    last); a worker with no local save (another machine) downloads the newest and resumes it."""
    import os
    import uuid

    import fsspec

    from daemon.stage_runs import StageInterrupted
    from workers.graceful_stop import listen_for_stop_requests
    from workers.trainer_state import SAVE_MARKER, RemoteTrainerState

    store = RemoteTrainerState(f"memory://kaizen-test-{uuid.uuid4().hex[:8]}/artifacts/checkpoints/.trainer-state-ckpt-0001")
    fs, root = fsspec.core.url_to_fs(store.uri)
    settings = SETTINGS.model_copy(update={"max_steps": 8, "save_steps": 2})

    def shutdown_at_step_3(entry: dict) -> None:
        if entry.get("step") == 3 and "loss" in entry:
            os.kill(os.getpid(), stop_listener)

    first_machine = tmp_path / "a" / "staging" / "ckpt-0001"
    with pytest.raises(StageInterrupted):
        dpo_update(str(base_dir), EXAMPLES, first_machine, settings, log_callback=shutdown_at_step_3, state_store=store)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["checkpoint-4"]  # the older save 2 was dropped
    assert fs.exists(f"{root}/checkpoint-4/{SAVE_MARKER}")

    listen_for_stop_requests()
    second_machine = tmp_path / "b" / "staging" / "ckpt-0001"
    result = dpo_update(str(base_dir), EXAMPLES, second_machine, settings, state_store=store)
    assert read_manifest(result.checkpoint_path).metadata["resumed_from_step"] == 4
    assert not fs.exists(root)  # committed: the saved state is removed from the store too


def test_a_cut_rejected_answer_trains_without_the_end_marker_and_others_keep_it(base_dir):
    """TRL appends the end of turn to every completion; a rejected answer cut at the budget never
    ended, and with the marker DPO would push down ending there."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer


    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    examples = [
        PreferenceExample(prompt="Name a fruit.", chosen="An apple.", rejected="A long list of fruits that", rejected_unfinished=True),
        PreferenceExample(prompt="Name a fruit.", chosen="An apple.", rejected="A long list of fruits that"),
    ]
    trainer_cls = unfinished_aware_trainer(DPOTrainer)
    trainer = object.__new__(trainer_cls)
    config = DPOConfig(output_dir="unused", max_length=128, report_to="none", use_cpu=True)
    prepared = trainer_cls._prepare_dataset(trainer, Dataset.from_list(trl_records(examples, tokenizer)), tokenizer, config, "train")
    cut, finished = prepared[0], prepared[1]
    # The tiny model's template ends a turn with "</s>\n".
    assert tokenizer.decode(finished["rejected_ids"][-2:]) == "</s>\n"
    assert cut["rejected_ids"] == finished["rejected_ids"][:-2]
    assert tokenizer.decode(cut["rejected_ids"]).endswith("fruits that")
    assert cut["chosen_ids"] == finished["chosen_ids"] and tokenizer.decode(cut["chosen_ids"][-2:]) == "</s>\n"


def test_without_end_marker_drops_the_last_special_token_and_the_blank_tokens_after_it():
    blank = {9}.__contains__  # token 9 decodes to "\n"
    assert without_end_marker([5, 6, 2, 9], {2}, blank) == [5, 6]
    assert without_end_marker([5, 6, 2], {2}, blank) == [5, 6]
    assert without_end_marker([5, 6, 9], {2}, blank) == [5, 6, 9]  # no end marker: unchanged
    assert without_end_marker([], {2}, blank) == []


@pytest.mark.parametrize("strip", [False, True])
def test_the_dpo_stage_marks_cut_rejected_answers_only_with_training_cut_rejected_without_end(tmp_path, tiny_model_dir, strip):
    from tests.factories import lineage_with_responses
    from workers.stages.dpo_update import preference_examples

    ctx, _ = lineage_with_responses(
        tmp_path / "data", tiny_model_dir, [("Name a fruit.", ["An apple."])],
        generation={"max_new_tokens": 16}, training={"cut_rejected_without_end": strip},
    )
    rows = [(1, "Name a fruit.", "An apple.", "A long list of", 16), (2, "Name a fruit.", "An apple.", "A pear, no.", 5)]
    examples, kept = preference_examples(ctx, rows, max_length=512)
    assert kept == {1, 2}
    assert [ex.rejected_unfinished for ex in examples] == [strip, False]
