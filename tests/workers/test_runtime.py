"""Tests for workers.runtime on the built-in tiny model (CPU, a few seconds in all)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.generation import Generation
from workers.runtime import ModelRuntime
from workers.runtime_cache import RUNTIME_CACHE_SIZE, cached_runtime_paths, clear_runtime_cache, get_runtime
from workers.tiny_model import build_tiny_model

QUESTIONS = [
    "hi",
    "Write a short poem about the sea, please, in four lines.",
    "Explain how photosynthesis works",
    "What is the difference between a list and a tuple in Python? Give an example.",
]


def _sharpen(model_dir: Path, scale: float = 3.0) -> None:
    """Scale the random weights up so greedy decoding depends on the context.

    At the default init the tiny model's argmax is "\\n" whatever the prompt, which would make the
    batched-vs-unbatched greedy comparison pass even with broken padding.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(scale)
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    _sharpen(path)
    return path


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts(runtime: ModelRuntime) -> list[str]:
    return [runtime.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_load_sets_up_tokenizer_and_eval_mode(runtime: ModelRuntime) -> None:
    assert runtime.tokenizer.padding_side == "left"
    assert runtime.tokenizer.pad_token_id is not None
    assert not runtime.model.training
    assert runtime.device.type == "cpu"
    assert runtime.eos_token_ids == [runtime.tokenizer.eos_token_id]


def test_render_chat_uses_template_and_fallback(runtime: ModelRuntime) -> None:
    text = runtime.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    no_prompt = runtime.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")

    plain = ModelRuntime(runtime.model, runtime.tokenizer, model_path="x", prompt_format="plain")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain.render_chat(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert plain.profile.stop_strings == ("\nUser:", "\nSystem:")


def test_batched_generation_shape(runtime: ModelRuntime, prompts: list[str]) -> None:
    out = runtime.generate(prompts[:3], num_samples=4, max_new_tokens=8, seed=0, batch_size=5)
    assert len(out) == 3
    for samples in out:
        assert len(samples) == 4
        for gen in samples:
            assert isinstance(gen, Generation)
            assert 1 <= gen.num_tokens <= 8
            assert gen.finished or gen.num_tokens == 8
            assert "<|assistant|>" not in gen.text  # prompt stripped


def test_seed_determinism(runtime: ModelRuntime, prompts: list[str]) -> None:
    kwargs = {"num_samples": 2, "max_new_tokens": 12, "temperature": 1.0}
    first = runtime.generate(prompts, seed=123, **kwargs)
    again = runtime.generate(prompts, seed=123, **kwargs)
    other = runtime.generate(prompts, seed=124, **kwargs)
    assert first == again
    assert first != other
    # Samples of one prompt differ from each other (the batch is not the same draw repeated).
    assert first[1][0].text != first[1][1].text


def test_seed_does_not_touch_global_rng(runtime: ModelRuntime, prompts: list[str]) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    runtime.generate(prompts[:1], max_new_tokens=4, seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_batched_equals_unbatched(runtime: ModelRuntime, prompts: list[str]) -> None:
    """The left-padding correctness test: prompts of different lengths in one batch."""
    lengths = {len(runtime.encode_prompt(p)) for p in prompts}
    assert len(lengths) == len(prompts)
    batched = runtime.generate(prompts, temperature=0, max_new_tokens=16, batch_size=16)
    single = [runtime.generate([p], temperature=0, max_new_tokens=16)[0] for p in prompts]
    assert batched == single
    assert len({samples[0].text for samples in batched}) > 1  # outputs depend on the prompt
    # Greedy samples of one prompt are all the same.
    multi = runtime.generate(prompts[:2], num_samples=3, temperature=0, max_new_tokens=8)
    assert all(len({g.text for g in samples}) == 1 for samples in multi)


def test_sample_counts_per_prompt_keep_each_prompts_answers(runtime: ModelRuntime, prompts: list[str]) -> None:
    """One call with a count per prompt (respond's policy samples + RLCD answers) maps answers to prompts."""
    counts = [2, 1, 3, 1]
    greedy = runtime.generate(prompts, num_samples=counts, temperature=0, max_new_tokens=10, batch_size=3)
    alone = [runtime.generate([p], temperature=0, max_new_tokens=10)[0][0] for p in prompts]
    assert [len(samples) for samples in greedy] == counts
    assert greedy == [[answer] * n for answer, n in zip(alone, counts, strict=True)]
    assert len({answer.text for answer in alone}) > 1  # the mapping is visible: answers depend on the prompt

    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "batch_size": 3}
    sampled = runtime.generate(prompts, num_samples=counts, seed=5, **kwargs)
    assert [len(samples) for samples in sampled] == counts
    assert runtime.generate(prompts, num_samples=counts, seed=5, **kwargs) == sampled  # the seed is respected
    assert runtime.generate(prompts, num_samples=counts, seed=6, **kwargs) != sampled
    # A uniform list is the integer count: existing callers decode exactly as before.
    assert runtime.generate(prompts, num_samples=[2] * 4, seed=5, **kwargs) == runtime.generate(prompts, num_samples=2, seed=5, **kwargs)


def test_sample_counts_must_match_the_prompts(runtime: ModelRuntime, prompts: list[str]) -> None:
    with pytest.raises(ValueError, match="2 sample counts for 4 prompts"):
        runtime.generate(prompts, num_samples=[1, 2])
    with pytest.raises(ValueError, match=">= 1"):
        runtime.generate(prompts, num_samples=[1, 0, 1, 1])


def test_stop_strings_truncate(runtime: ModelRuntime, prompts: list[str]) -> None:
    kwargs = {"max_new_tokens": 24, "temperature": 1.0, "seed": 5}
    full = runtime.generate(prompts[:1], **kwargs)[0][0]
    # Take an ASCII letter from the middle of the free-running text as the stop string.
    middle = full.text[len(full.text) // 3 :]
    stop = next(ch for ch in middle if ch.isascii() and ch.isalpha())
    stopped = runtime.generate(prompts[:1], stop_strings=[stop], **kwargs)[0][0]
    assert stop not in stopped.text
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.finished
    assert stopped.num_tokens < full.num_tokens


def _hand_logprob(runtime: ModelRuntime, prompt: str, completion: str) -> float:
    tok = runtime.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(runtime.model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    return sum(logprobs[start + j - 1, t].item() for j, t in enumerate(completion_ids))


def test_sequence_logprobs_match_unpadded_forward(runtime: ModelRuntime, prompts: list[str]) -> None:
    completions = [
        "The sea is wide.",
        "Roses are red",
        "Plants turn light into sugar, step by step.",
        "x",
    ]
    got = runtime.sequence_logprobs(prompts, completions, batch_size=3)
    expected = [_hand_logprob(runtime, p, c) for p, c in zip(prompts, completions, strict=True)]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4)
    assert all(lp <= 0 for lp in got)

    per_token = runtime.token_logprobs(prompts, completions, batch_size=8)
    for lps, completion, total in zip(per_token, completions, got, strict=True):
        assert len(lps) == len(runtime.encode_completion(completion))
        assert all(lp <= 0 for lp in lps)
        assert sum(lps) == pytest.approx(total, abs=1e-4)
    assert runtime.sequence_logprobs(prompts[:1], [""]) == [0.0]


def test_next_token_distribution(runtime: ModelRuntime, prompts: list[str]) -> None:
    candidates = ["1", "2", "3", "4", "5"]
    dists = runtime.next_token_distribution(prompts, candidates, batch_size=3)
    assert len(dists) == len(prompts)
    for dist in dists:
        assert len(dist) == len(candidates)
        assert sum(dist) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in dist)
    # Agrees with the full-vocabulary softmax of an unpadded forward pass, renormalised.
    ids = runtime.candidate_token_ids(candidates)
    prompt_ids = torch.tensor([runtime.tokenizer(prompts[1])["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(runtime.model(input_ids=prompt_ids).logits[0, -1].float(), dim=-1)[ids]
    assert torch.allclose(torch.tensor(dists[1]), probs / probs.sum(), atol=1e-5)


def test_get_runtime_caches_and_evicts(model_dir: Path, tmp_path: Path) -> None:
    clear_runtime_cache()
    try:
        first = get_runtime(str(model_dir))
        assert get_runtime(str(model_dir)) is first
        assert get_runtime(str(model_dir / ".." / model_dir.name)) is first  # keyed by resolved path

        others = []
        for i in range(RUNTIME_CACHE_SIZE):
            copy = tmp_path / f"m{i}"
            shutil.copytree(model_dir, copy)
            others.append(get_runtime(str(copy)))
        paths = cached_runtime_paths()
        assert len(paths) == RUNTIME_CACHE_SIZE
        assert str(model_dir.resolve()) not in paths  # least recently used went first
        assert get_runtime(str(tmp_path / f"m{RUNTIME_CACHE_SIZE - 1}")) is others[-1]
        assert get_runtime(str(model_dir)) is not first  # reloaded after eviction
    finally:
        clear_runtime_cache()
    assert cached_runtime_paths() == []


def test_output_scale_gives_the_random_model_a_trained_models_logit_range(tmp_path: Path) -> None:
    ids = torch.tensor([list(range(3, 40))])

    def logits(name: str, **options) -> tuple[torch.Tensor, AutoModelForCausalLM]:
        model = AutoModelForCausalLM.from_pretrained(str(build_tiny_model(tmp_path / name, hidden_size=128, **options)))
        with torch.no_grad():
            return model(input_ids=ids).logits[0], model

    plain, _ = logits("default")
    scaled, untied = logits("scaled", tie_embeddings=False, output_scale=6.0)

    # The default random model's logits stay within a few units; a trained model's span tens of units.
    assert plain.abs().max() < 4 < scaled.abs().max()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    # Tied, it predicts the token it just read; with an output layer of its own it does not.
    assert (plain.argmax(-1) == ids[0]).float().mean() > 0.9
    assert (scaled.argmax(-1) == ids[0]).float().mean() < 0.2
