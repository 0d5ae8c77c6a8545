"""GenARM on tiny models: ARM training, guided decoding, KV caches, multi-objective, weak-to-strong."""

from __future__ import annotations

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
    IncrementalReward,
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
from tests.workers.genarm_data import marker_pairs

BETA = 0.1
ARM_SETTINGS = GenArmStageSettings(beta=BETA, learning_rate=5e-3, max_steps=30, batch_size=8, lora_r=8, lora_alpha=16, max_length=96)
DECODE = {"beta": BETA, "max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stepping_request_caches_together_equals_stepping_each_alone(arch: str, tiny_model_dir: Path, base, prompts) -> None:
    """The vLLM processor's batched step: unpadded one-row caches of different lengths, one token each."""
    arm = sharp_reward_model(arch, tiny_model_dir)
    rows = [base.encode_prompt(p) for p in (prompts[0], prompts[3], prompts[5])]
    assert len({len(r) for r in rows}) == len(rows)
    together, alone = [IncrementalReward(arm) for _ in rows], [IncrementalReward(arm) for _ in rows]
    rng = torch.Generator().manual_seed(0)

    def one(reward: IncrementalReward, ids: list[int]) -> torch.Tensor:
        return reward.next_logprobs(torch.tensor([ids]), torch.ones((1, reward.length + len(ids)), dtype=torch.long))[0]

    with torch.inference_mode():
        for a, b, row in zip(together, alone, rows, strict=True):
            one(a, row), one(b, row)
        for step in range(4):
            tokens = torch.randint(10, arm.config.vocab_size, (len(rows),), generator=rng).tolist()
            if step == 2:  # a step alone on a cache that was stepped in the batch before
                assert torch.allclose(one(together[1], [tokens[1]]), one(alone[1], [tokens[1]]), atol=1e-4)
                continue
            stepped = IncrementalReward.step_together(together, tokens)
            for i, (reward, token) in enumerate(zip(alone, tokens, strict=True)):
                expected = one(reward, [token])
                assert torch.allclose(stepped[i], expected, atol=1e-4), f"row {i} differs by {(stepped[i] - expected).abs().max()}"
        assert [r.length for r in together] == [r.length for r in alone]


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
