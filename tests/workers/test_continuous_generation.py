"""generation.scheduler: continuous — loop generation through the continuous-batching engine gives
the static path's greedy answers exactly, the same shape and order, reproducible seeded samples,
and the same finished / truncated flags."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from daemon.config import load_settings
from policies.end_ramp import EndRamp
from policies.self_instruct import load_seed_prompts
from workers import continuous_generation, generation
from workers.evaluation import greedy_answers
from workers.runtime import ModelRuntime
from workers.stages.common import sample
from workers.tiny_model import build_tiny_model

COUNTS = [2, 1, 3, 1, 2, 1, 1, 2]
MAX_NEW = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Untied and scaled output layer: the random model's greedy answers vary from prompt to prompt
    # (and some end in EOS), where the tied tiny model repeats one token.
    return build_tiny_model(
        tmp_path_factory.mktemp("untied") / "model", extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0
    )


@pytest.fixture(scope="module")
def runtime(model_dir: Path, one_torch_thread: None) -> ModelRuntime:
    return ModelRuntime.load(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts(runtime: ModelRuntime) -> list[str]:
    return [runtime.render_chat([{"role": "user", "content": q}]) for q in load_seed_prompts()[: len(COUNTS)]]


def _both(runtime: ModelRuntime, prompts: list[str], **kwargs):  # type: ignore[no-untyped-def]
    static = runtime.generate(prompts, scheduler="static", **kwargs)
    continuous = runtime.generate(prompts, scheduler="continuous", **kwargs)
    return static, continuous


def test_greedy_answers_are_the_static_paths_text_tokens_and_flags(runtime: ModelRuntime, prompts: list[str]) -> None:
    # batch_size 3 < 8 prompts: rows join the running batch as others finish.
    static, continuous = _both(runtime, prompts, num_samples=COUNTS, max_new_tokens=MAX_NEW, temperature=0.0, batch_size=3)
    assert continuous == static
    assert [len(samples) for samples in continuous] == COUNTS
    flat = [g for samples in continuous for g in samples]
    assert len({g.text for g in flat}) > 3, "the test model must give varied answers"
    assert any(g.finished for g in flat) and any(not g.finished for g in flat), "both EOS and the token cap occur"
    for samples in continuous:
        assert all(g == samples[0] for g in samples), "greedy: a prompt's samples are one answer repeated"


def test_greedy_stop_strings_and_eos_tokens_end_answers_as_on_the_static_path(
    runtime: ModelRuntime, prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = runtime.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    # Stop strings taken from the middle of two answers, and a token of a third answer as an extra
    # EOS id (not a special token, so its text is part of the answer): all three end early.
    stops = [plain[1][0].text[6:9], plain[5][0].text[10:12]]
    context = runtime.context_ids(prompts[3])
    with torch.inference_mode():
        out = runtime.model.generate(
            input_ids=torch.tensor([context]), attention_mask=torch.ones(1, len(context), dtype=torch.long),
            max_new_tokens=8, do_sample=False, pad_token_id=runtime.pad_token_id,
        )
    extra_eos = int(out[0, len(context) + 5])
    monkeypatch.setattr(runtime, "eos_token_ids", [extra_eos, *runtime.eos_token_ids])
    static, continuous = _both(runtime, prompts, max_new_tokens=MAX_NEW, temperature=0.0, batch_size=3, stop_strings=stops)
    assert continuous == static
    assert continuous[1][0].finished and stops[0] not in continuous[1][0].text
    assert continuous[1][0].num_tokens < plain[1][0].num_tokens
    assert continuous[3][0].finished and continuous[3][0].num_tokens <= 6


def test_sampled_answers_are_reproducible_per_seed_and_differ_across_samples(runtime: ModelRuntime, prompts: list[str]) -> None:
    kwargs = {"num_samples": COUNTS, "max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "scheduler": "continuous"}
    first = runtime.generate(prompts, seed=7, batch_size=4, **kwargs)
    assert runtime.generate(prompts, seed=7, batch_size=4, **kwargs) == first
    # Each sequence has its own generator seeded by (seed, prompt, sample): how rows share the
    # batch does not change what they sample.
    assert runtime.generate(prompts, seed=7, batch_size=1, **kwargs) == first
    assert [len(samples) for samples in first] == COUNTS
    assert len({g.text for g in first[2]}) == 3, "a prompt's samples differ"
    other = runtime.generate(prompts, seed=8, batch_size=4, **kwargs)
    assert [g.text for s in other for g in s] != [g.text for s in first for g in s]
    state = torch.get_rng_state()
    runtime.generate(prompts[:2], seed=7, batch_size=4, **{**kwargs, "num_samples": 2})
    assert torch.equal(torch.get_rng_state(), state), "a seeded call leaves the global RNG alone"
    unseeded = [runtime.generate(prompts[:2], batch_size=4, **{**kwargs, "num_samples": 2}) for _ in range(2)]
    assert unseeded[0] != unseeded[1], "without a seed two calls sample afresh"


def test_sequence_seeds_are_deterministic_and_distinct() -> None:
    seeds = {continuous_generation.sequence_seed(5, i, j) for i in range(20) for j in range(8)}
    assert len(seeds) == 160 and all(0 <= s < 2**63 for s in seeds)
    assert continuous_generation.sequence_seed(5, 3, 1) == continuous_generation.sequence_seed(5, 3, 1)
    assert continuous_generation.sequence_seed(5, 3, 1) != continuous_generation.sequence_seed(6, 3, 1)


def test_a_cpu_batch_admits_waiting_sequences_a_quarter_batch_at_a_time() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [continuous_generation.admit_group(n, cpu) for n in (1, 3, 4, 32)] == [1, 1, 1, 8]
    assert continuous_generation.admit_group(32, cuda) == 1


def test_a_token_cap_marks_answers_unfinished_as_on_the_static_path(runtime: ModelRuntime, prompts: list[str]) -> None:
    for temperature, seed in ((0.0, None), (0.8, 3)):
        continuous = runtime.generate(
            prompts, num_samples=2, max_new_tokens=4, temperature=temperature, seed=seed, batch_size=5, scheduler="continuous"
        )
        flat = [g for samples in continuous for g in samples]
        assert any(not g.finished for g in flat)
        for g in flat:
            assert g.num_tokens <= 4
            assert g.finished or g.num_tokens == 4, "an unfinished answer ran into the cap"
        if temperature == 0.0:
            assert continuous == runtime.generate(prompts, num_samples=2, max_new_tokens=4, temperature=0.0, batch_size=5)
    # The answer that ends in EOS at 24 tokens' budget is finished; cut at 8 tokens it is not.
    full = runtime.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, scheduler="continuous")
    ended = [i for i, s in enumerate(full) if s[0].finished and s[0].num_tokens > 8]
    assert ended, "some greedy answer ends by itself after more than 8 tokens"
    capped = runtime.generate([prompts[i] for i in ended], max_new_tokens=8, temperature=0.0, scheduler="continuous")
    assert all(not s[0].finished and s[0].num_tokens == 8 for s in capped)
    assert [s[0].text for s in capped] == [full[i][0].text[: len(s[0].text)] for i, s in zip(ended, capped)]


def test_progress_counts_prompts_and_bad_arguments_are_refused(runtime: ModelRuntime, prompts: list[str]) -> None:
    calls: list[tuple[int, int]] = []
    runtime.generate(prompts, num_samples=COUNTS, max_new_tokens=6, temperature=0.8, seed=1, batch_size=3,
                     scheduler="continuous", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, len(prompts)) for k in range(1, len(prompts) + 1)]
    assert runtime.generate([], scheduler="continuous") == []
    with pytest.raises(ValueError, match="unknown scheduler"):
        runtime.generate(prompts, scheduler="dynamic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="continuous scheduler"):
        runtime.generate(prompts, scheduler="continuous", min_new_tokens=3)


def test_an_engine_failure_is_raised_to_the_caller_and_the_next_call_works(
    runtime: ModelRuntime, prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.batch_engine import BatchEngine

    real, calls = BatchEngine._forward, []

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in a decode step")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BatchEngine, "_forward", failing)
    with pytest.raises(RuntimeError, match="boom in a decode step"):
        runtime.generate(prompts, num_samples=2, max_new_tokens=8, temperature=0.8, seed=1, batch_size=4, scheduler="continuous")
    monkeypatch.setattr(BatchEngine, "_forward", real)
    again = runtime.generate(prompts, max_new_tokens=8, temperature=0.0, batch_size=4, scheduler="continuous")
    assert again == runtime.generate(prompts, max_new_tokens=8, temperature=0.0, batch_size=4)


def test_the_config_routes_stage_sampling_and_suite_answers(
    model_dir: Path, tmp_path: Path, prompts: list[str], monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    used: list[int] = []
    real = generation.decode_continuously

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        used.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_continuously", counting)
    results = {}
    for scheduler in ("static", "continuous"):
        config = tmp_path / f"{scheduler}.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / "data"), "model": {"path": str(model_dir)},
            "generation": {"scheduler": scheduler, "batch_size": 3, "max_new_tokens": 12},
            "eval": {"max_new_tokens": 12, "batch_size": 3},
        }))
        settings = load_settings(config)
        assert settings.generation.scheduler == scheduler
        runtime = ModelRuntime.load(str(model_dir), device="cpu")
        sampled = sample(SimpleNamespace(settings=settings), runtime, prompts[:3], n=[2, 1, 2], seed=11, temperature=0.0)
        answers = greedy_answers(settings, str(model_dir), load_seed_prompts()[:3])
        results[scheduler] = (sampled, answers)
    default = tmp_path / "default.yaml"
    default.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "model": {"path": str(model_dir)}}))
    assert load_settings(default).generation.scheduler == "continuous", "the measured-faster scheduler is the default"
    assert used == [3, 3], "continuous: one engine run for the stage's sampling, one for the suite answers"
    assert results["continuous"] == results["static"]
    assert [len(s) for s in results["continuous"][0]] == [2, 1, 2]


def test_end_ramp_is_the_same_on_both_schedulers_and_leaves_the_answer_before_its_start(runtime: ModelRuntime, prompts: list[str]) -> None:
    plain = runtime.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, batch_size=3)
    static, continuous = _both(runtime, prompts, max_new_tokens=MAX_NEW, temperature=0.0, batch_size=3, end_ramp=EndRamp(50.0, start=0.5))
    assert continuous == static
    begin = MAX_NEW // 2
    for [before], [after] in zip(plain, continuous, strict=True):
        ids_before = runtime.tokenizer(before.text, add_special_tokens=False)["input_ids"]
        ids_after = runtime.tokenizer(after.text, add_special_tokens=False)["input_ids"]
        assert ids_after[:begin] == ids_before[: len(ids_after[:begin])], "no bonus before the ramp starts"
    cut_before = sum(not g.finished for [g] in plain)
    assert cut_before > 0, "without the ramp some answers run to the token cap"
    assert all(g.finished for [g] in continuous), "a 50-logit end bonus ends every answer"


def test_a_small_end_ramp_lowers_the_sampled_truncation_rate(runtime: ModelRuntime, prompts: list[str]) -> None:
    kwargs = dict(num_samples=6, max_new_tokens=MAX_NEW, temperature=1.0, seed=5, batch_size=16, scheduler="continuous")
    plain = [g for samples in runtime.generate(prompts, **kwargs) for g in samples]
    ramped = [g for samples in runtime.generate(prompts, end_ramp=EndRamp(4.0, start=0.5), **kwargs) for g in samples]
    cut = sum(not g.finished for g in plain)
    assert sum(not g.finished for g in ramped) < cut
