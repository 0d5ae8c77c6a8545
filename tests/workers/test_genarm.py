"""GenARM on tiny models: ARM training, guided decoding, KV caches, multi-objective, weak-to-strong."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from daemon.config import GenArmStageSettings
from policies.genarm import GuidanceError
from policies.self_instruct import load_seed_prompts
from workers.checkpoints import CheckpointError, verify_checkpoint
from workers.genarm import (
    ARM_CHECKPOINT_KIND,
    RewardGuidanceProcessor,
    RewardGuide,
    TokenizerMismatchError,
    check_shared_tokenizer,
    guided_generate,
    load_guides,
    score_pairs,
    train_autoregressive_reward_model,
    trained_arm_beta,
)
from workers.runtime import ModelRuntime
from workers.tiny_model import build_tiny_model
from workers.training import PreferenceExample

BETA = 0.1
ARM_SETTINGS = GenArmStageSettings(beta=BETA, learning_rate=5e-3, max_steps=30, batch_size=8, lora_r=8, lora_alpha=16, max_length=96)
FILLER = "the sea is clear and cold we like to walk along the shore every day with some people from the town".split()
DECODE = {"beta": BETA, "max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def marker_pairs(marker: str, instead: str, *, n: int = 24, seed: int = 0) -> list[PreferenceExample]:
    """Chosen answers say ``marker`` where the otherwise identical rejected ones say ``instead``."""
    rng = random.Random(seed)
    prompts = load_seed_prompts()
    examples = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(10)]
        spots = rng.sample(range(len(words)), 3)
        chosen = [marker if k in spots else w for k, w in enumerate(words)]
        rejected = [instead if k in spots else w for k, w in enumerate(words)]
        examples.append(PreferenceExample(prompt=prompts[i % len(prompts)], chosen=" ".join(chosen), rejected=" ".join(rejected)))
    return examples


def count_word(generations, word: str) -> int:
    return sum(len(re.findall(rf"\b{word}\b", g.text)) for g in generations)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts(base: ModelRuntime) -> list[str]:
    return [base.render_chat([{"role": "user", "content": q}]) for q in load_seed_prompts()[:16]]


@pytest.fixture(scope="module")
def water_arm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An ARM that prefers answers saying "water" to the same answers saying "five"."""
    out = tmp_path_factory.mktemp("arms") / "water"
    return train_autoregressive_reward_model(str(tiny_model_dir), marker_pairs("water", "five"), out, ARM_SETTINGS)


@pytest.fixture(scope="module")
def five_arm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The opposite preference: trained on the same kind of pairs, swapped."""
    out = tmp_path_factory.mktemp("arms") / "five"
    return train_autoregressive_reward_model(str(tiny_model_dir), marker_pairs("five", "water", seed=1), out, ARM_SETTINGS)


@pytest.fixture(scope="module")
def water(water_arm) -> ModelRuntime:
    return ModelRuntime.load(water_arm.path, device="cpu")


@pytest.fixture(scope="module")
def five(five_arm) -> ModelRuntime:
    return ModelRuntime.load(five_arm.path, device="cpu")


def sharpened(model):
    """Scale a randomly initialised model's weights up, so its next-token log-probs depend visibly
    on context and positions (at the default init they are nearly uniform)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(3.0)
    return model.eval()


def sharp_reward_model(arch: str, tiny_model_dir: Path):
    """Llama (rotary positions: a shift of all positions changes nothing, the padding mask does) or
    GPT-2 (learned absolute positions: wrong position ids change the output)."""
    if arch == "llama":
        return sharpened(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return sharpened(GPT2LMHeadModel(config))


# =========================================================================== training


def test_bradley_terry_training_lowers_the_loss_and_raises_pair_accuracy(water_arm) -> None:
    assert water_arm.loss_after < water_arm.loss_before - 0.2
    assert water_arm.accuracy_after == 1.0 > water_arm.accuracy_before
    assert water_arm.steps == ARM_SETTINGS.max_steps == len(water_arm.loss_history)
    first, last = water_arm.loss_history[:5], water_arm.loss_history[-5:]
    assert sum(last) / 5 < sum(first) / 5


def test_the_arm_checkpoint_is_atomic_and_reloads_to_the_reported_scores(water_arm) -> None:
    manifest = verify_checkpoint(water_arm.path)
    assert manifest.metadata["kind"] == ARM_CHECKPOINT_KIND
    assert manifest.metadata["beta"] == BETA == trained_arm_beta(water_arm.path)
    assert manifest.metadata["metrics"]["accuracy_after"] == water_arm.accuracy_after
    model = AutoModelForCausalLM.from_pretrained(water_arm.path)
    tokenizer = AutoTokenizer.from_pretrained(water_arm.path)
    loss, accuracy = score_pairs(model, tokenizer, marker_pairs("water", "five"), beta=BETA, max_length=ARM_SETTINGS.max_length)
    assert loss == pytest.approx(water_arm.loss_after, abs=1e-4)
    assert accuracy == water_arm.accuracy_after


def test_a_plain_model_is_not_an_arm(tiny_model_dir: Path) -> None:
    assert trained_arm_beta(tiny_model_dir) is None


def test_training_again_into_the_same_directory_reuses_the_arm(tiny_model_dir: Path, water_arm) -> None:
    again = train_autoregressive_reward_model(str(tiny_model_dir), marker_pairs("water", "five"), Path(water_arm.path), ARM_SETTINGS)
    assert again.reused and again.path == water_arm.path
    assert (again.loss_after, again.accuracy_after, again.beta) == (water_arm.loss_after, water_arm.accuracy_after, BETA)
    with pytest.raises(CheckpointError, match="refusing to reuse"):
        train_autoregressive_reward_model("some/other/base", marker_pairs("water", "five"), Path(water_arm.path), ARM_SETTINGS)


def test_full_fine_tune_without_lora_also_learns_the_preference(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = GenArmStageSettings(beta=BETA, learning_rate=2e-3, max_steps=8, batch_size=8, lora_r=0, max_length=96)
    result = train_autoregressive_reward_model(str(tiny_model_dir), marker_pairs("water", "five", n=8), tmp_path / "arm", settings)
    assert result.loss_after < result.loss_before
    assert result.accuracy_after > result.accuracy_before


def test_training_settings_and_inputs_are_validated(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="beta"):
        GenArmStageSettings(beta=0)
    with pytest.raises(ValueError, match="lora_r"):
        GenArmStageSettings(lora_r=-1)
    with pytest.raises(ValueError, match="at least one preference pair"):
        train_autoregressive_reward_model(str(tiny_model_dir), [], tmp_path / "arm", ARM_SETTINGS)


# =========================================================================== guided decoding


def test_guidance_raises_the_frequency_of_the_preferred_word(base, water, prompts) -> None:
    unguided = base.generate(prompts, num_samples=1, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
    guided = guided_generate(base, [(water, 1.0)], prompts, **DECODE)
    before, after = count_word([g[0] for g in unguided], "water"), count_word(guided, "water")
    assert after >= before + 10, (before, after)
    assert len(guided) == len(prompts)


def test_weight_zero_reproduces_unguided_output_exactly(base, water, prompts) -> None:
    unguided = [g[0] for g in base.generate(prompts, num_samples=1, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)]
    assert guided_generate(base, [(water, 0.0)], prompts, **DECODE) == unguided
    assert guided_generate(base, [], prompts, **DECODE) == unguided


def test_a_zero_weight_processor_runs_the_reward_model_yet_changes_no_token(base, water, prompts) -> None:
    # guided_generate skips zero-weight reward models; here one is kept in the loop on purpose, to
    # show that adding guidance to the raw logits leaves sampling bit-for-bit unchanged.
    calls = []
    hook = water.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        kept = base.generate(
            prompts, num_samples=1, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3,
            logits_processors=lambda ids, mask: [RewardGuidanceProcessor([water.model], [0.0], BETA, ids, mask)],
        )
    finally:
        hook.remove()
    assert calls, "the reward model should have run"
    assert kept == base.generate(prompts, num_samples=1, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3)


def test_guided_decoding_is_reproducible_for_a_seed(base, water, prompts) -> None:
    first = guided_generate(base, [(water, 1.0)], prompts[:4], **DECODE)
    assert guided_generate(base, [(water, 1.0)], prompts[:4], **DECODE) == first


def test_guided_decoding_honours_stop_strings(base, water, prompts) -> None:
    free = guided_generate(base, [(water, 1.0)], prompts, **DECODE)
    stopped = guided_generate(base, [(water, 1.0)], prompts, **DECODE, stop=["water"])
    hit = [i for i, g in enumerate(free) if "water" in g.text]
    assert hit, "the guided model should say the preferred word somewhere"
    for i in hit:
        assert "water" not in stopped[i].text and stopped[i].finished
        assert free[i].text.startswith(stopped[i].text)  # same seed: the same text, cut at the stop


def test_multi_objective_weights_move_each_marker_in_its_direction(base, water, five, prompts) -> None:
    def counts(w_water: float, w_five: float) -> tuple[int, int]:
        out = guided_generate(base, [(water, w_water), (five, w_five)], prompts, **DECODE)
        return count_word(out, "water"), count_word(out, "five")

    water_only, five_only, neither = counts(1.0, 0.0), counts(0.0, 1.0), counts(0.0, 0.0)
    assert water_only[0] >= neither[0] + 10 and water_only[0] > five_only[0] + 10
    assert five_only[1] >= neither[1] + 10 and five_only[1] > water_only[1] + 10
    # Moving weight from one reward model to the other moves each marker the same way.
    leaning_water, leaning_five = counts(0.75, 0.25), counts(0.25, 0.75)
    assert water_only[0] > leaning_water[0] > leaning_five[0]
    assert five_only[1] > leaning_five[1] >= leaning_water[1]


def test_reward_models_keep_their_kv_cache_one_new_token_per_step(base, water, five, prompts) -> None:
    batch = prompts[:5]
    widths = [len(base.encode_prompt(p)) for p in batch]
    assert len(set(widths)) > 1, "the batch must need left padding"
    seen: dict[str, list[tuple[tuple[int, ...], int]]] = {"water": [], "five": []}

    def recorder(name):
        def hook(_module, _args, kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 names it "cache"
            seen[name].append((tuple(kwargs["input_ids"].shape), 0 if cache is None else cache.get_seq_length()))
        return hook

    hooks = [water.model.register_forward_pre_hook(recorder("water"), with_kwargs=True),
             five.model.register_forward_pre_hook(recorder("five"), with_kwargs=True)]
    try:
        out = guided_generate(base, [(water, 0.6), (five, 0.4)], batch, **DECODE)
    finally:
        for h in hooks:
            h.remove()
    steps = max(g.num_tokens for g in out)  # the batch decodes until its longest row is done
    width = max(widths)
    for calls in seen.values():
        assert len(calls) == steps
        assert calls[0] == ((len(batch), width), 0)  # the prompt, once
        assert calls[1:] == [((len(batch), 1), width + k) for k in range(steps - 1)]  # then one token, on the cache


def _left_padded(runtime: ModelRuntime, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    rows = [runtime.encode_prompt(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), runtime.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask, rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_incremental_guidance_equals_scoring_each_unpadded_row_from_scratch(arch: str, tiny_model_dir: Path, base, prompts) -> None:
    arm = sharp_reward_model(arch, tiny_model_dir)
    ids, mask, rows = _left_padded(base, [prompts[0], prompts[3], prompts[5]])
    vocab = base.model.config.vocab_size
    processor = RewardGuidanceProcessor([arm], [1.0], 1.0, ids, mask)
    rng = torch.Generator().manual_seed(0)

    def alone(row: list[int]) -> torch.Tensor:
        return torch.log_softmax(arm(input_ids=torch.tensor([row])).logits[0, -1].float(), dim=-1)

    with torch.inference_mode():
        for _step in range(4):
            guided = processor(ids, torch.zeros(len(rows), vocab))  # zero base scores: the output is log p_arm
            for i, row in enumerate(rows):
                assert torch.allclose(guided[i], alone(row), atol=1e-4), f"row {i} differs by {(guided[i] - alone(row)).abs().max()}"
            new = torch.randint(10, vocab, (len(rows), 1), generator=rng)
            ids = torch.cat([ids, new], dim=-1)
            rows = [r + [int(t)] for r, t in zip(rows, new[:, 0], strict=True)]
        # The comparison can fail: the most padded row changes when the padding is attended to
        # (Llama) or when positions are counted over the padding (GPT-2).
        padded = int((mask[:, 0] == 0).nonzero()[0])
        full_mask = torch.cat([mask, torch.ones(len(rows), ids.shape[1] - mask.shape[1], dtype=torch.long)], dim=-1)
        ablated = {"llama": {}, "gpt2": {"attention_mask": full_mask}}[arch]
        wrong = torch.log_softmax(arm(input_ids=ids, **ablated).logits[padded, -1].float(), dim=-1)
        assert (wrong - alone(rows[padded])).abs().max() > 1e-2


def test_guidance_supports_several_samples_per_prompt(base, water, prompts) -> None:
    out = base.generate(
        prompts[:3], num_samples=3, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0,
        logits_processors=lambda ids, mask: [RewardGuidanceProcessor([water.model], [1.0], BETA, ids, mask)],
    )
    assert [len(samples) for samples in out] == [3, 3, 3]


def test_a_processor_refuses_a_batch_it_was_not_built_for(base, water, prompts) -> None:
    ids, mask, _ = _left_padded(base, prompts[:2])
    processor = RewardGuidanceProcessor([water.model], [1.0], BETA, ids, mask)
    with pytest.raises(RuntimeError, match="other than the one it was built for"):
        processor(torch.flip(ids, dims=[0]), torch.zeros(2, water.model.config.vocab_size))


def test_invalid_weights_and_beta_are_refused(base, water, prompts) -> None:
    with pytest.raises(GuidanceError, match="swapped pairs"):
        guided_generate(base, [(water, -0.5)], prompts[:1], **DECODE)
    with pytest.raises(GuidanceError, match="beta"):
        guided_generate(base, [(water, 1.0)], prompts[:1], **{**DECODE, "beta": 0.0})
    with pytest.raises(GuidanceError, match="finite"):
        guided_generate(base, [(water, float("nan"))], prompts[:1], **DECODE)


def test_load_guides_pairs_runtimes_with_weights(water_arm) -> None:
    loaded = load_guides([RewardGuide(water_arm.path, 0.5)], loader=lambda path: ModelRuntime.load(path, device="cpu"))
    assert [(rt.model_path, w) for rt, w in loaded] == [(water_arm.path, 0.5)]


# =========================================================================== weak-to-strong and tokenizers


@pytest.fixture(scope="module")
def larger_base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base twice as wide and deep as the ARMs' model, with the very same tokenizer files."""
    out = build_tiny_model(tmp_path_factory.mktemp("larger") / "model", hidden_size=128, num_layers=4, seed=1)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_a_small_reward_model_guides_a_larger_base(larger_base_dir: Path, water, prompts) -> None:
    larger = ModelRuntime.load(str(larger_base_dir), device="cpu")
    arm_params = sum(p.numel() for p in water.model.parameters())
    assert sum(p.numel() for p in larger.model.parameters()) > 2 * arm_params
    before = count_word(guided_generate(larger, [(water, 0.0)], prompts, **DECODE), "water")
    after = count_word(guided_generate(larger, [(water, 1.0)], prompts, **DECODE), "water")
    assert after >= before + 10, (before, after)


def test_identical_tokenizers_loaded_separately_are_accepted(tiny_model_dir: Path, larger_base_dir: Path) -> None:
    check_shared_tokenizer(
        AutoTokenizer.from_pretrained(larger_base_dir), AutoTokenizer.from_pretrained(tiny_model_dir), base_name="larger", reward_name="tiny"
    )


@pytest.fixture(scope="module")
def foreign_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer was trained on another corpus: a different vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("foreign") / "model", extra_corpus=["zebra xylophone quartz " * 20] * 5)


def test_a_reward_model_with_another_vocabulary_is_refused(base, foreign_model_dir: Path, prompts) -> None:
    foreign = ModelRuntime.load(str(foreign_model_dir), device="cpu")
    with pytest.raises(TokenizerMismatchError) as caught:
        guided_generate(base, [(foreign, 1.0)], prompts[:1], **DECODE)
    message = str(caught.value)
    assert base.model_path in message and str(foreign_model_dir) in message
    assert "tokens only in the base" in message and "tokens only in the reward model" in message
    assert "tokens with different ids" in message
    assert (caught.value.base_name, caught.value.reward_name) == (base.model_path, str(foreign_model_dir))


def test_the_same_vocabulary_with_a_different_text_split_is_refused(tiny_model_dir: Path) -> None:
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lowercasing = AutoTokenizer.from_pretrained(tiny_model_dir)
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert base_tokenizer.get_vocab() == lowercasing.get_vocab()
    with pytest.raises(TokenizerMismatchError, match=r"'Hello, world! How are you today\?' encodes as plain text to"):
        check_shared_tokenizer(base_tokenizer, lowercasing, base_name="base", reward_name="lowercasing")


# =========================================================================== stage


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
