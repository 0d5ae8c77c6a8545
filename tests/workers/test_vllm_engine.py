"""model.engine: vllm on the tiny model: respond samples N answers per prompt through vLLM, the
logprob judge scores what the HF runtime scores (within 1e-3), and a checkpoint's LoRA adapter,
run on the engine of its base, answers and scores as its merged weights do on HF.

Needs vLLM (``bash ops/install_vllm.sh VENV cpu dev``, README "vLLM engine"); skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (model.engine: vllm; install with ops/install_vllm.sh, README 'vLLM engine')")

from daemon.db.models import Response  # noqa: E402
from policies.end_ramp import EndRamp  # noqa: E402
from policies.self_instruct import load_seed_prompts  # noqa: E402
from tests.factories import lineage_with_responses, lora_candidate, run_respond  # noqa: E402
from workers.lora_training import checkpoint_adapter  # noqa: E402
from workers.runtime import ModelRuntime  # noqa: E402
from workers.stages.common import judge_prompt, parent_checkpoint, prompts_of_role, stage_judge, user_prompt  # noqa: E402
from workers.tiny_model import build_tiny_model  # noqa: E402
from workers.vllm_engine import VllmRuntime, lora_adapter, stop_vllm_engine  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["hi", "Write a short poem about the sea.", "Explain how photosynthesis works"]
N = 3
ANSWERS = ["Paris.", "The sea is wide and grey.", "", "Plants turn light into sugar. " * 4]
ENGINE = {"engine": "vllm", "vllm_kv_cache_gib": 0.25, "cpu_threads": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The project's tiny model with hidden size 128: vLLM's CPU attention takes head sizes of 32
    # and up (the default 64 / 4 heads is 16). A scaled, untied output layer makes greedy answers
    # depend on the prompt (as in test_respond).
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", hidden_size=128, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0,
    )


@pytest.fixture(scope="module", autouse=True)
def one_engine() -> object:
    yield
    stop_vllm_engine()


@pytest.fixture
def vllm_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model path of every VllmRuntime.generate call."""
    calls: list[str] = []
    original = VllmRuntime.generate

    def recording(self, prompts, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(self.model_path)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(VllmRuntime, "generate", recording)
    return calls


def _respond(tmp_path: Path, model_dir: Path, **generation: float) -> tuple[list[Response], dict]:
    return run_respond(tmp_path / "data", model_dir, PROMPTS, N, model=ENGINE, generation={"max_new_tokens": 8, **generation})


def _policy_by_prompt(rows: list[Response]) -> list[list[Response]]:
    grouped: dict[int, list[Response]] = {}
    for row in rows:
        if row.kind == "policy":
            grouped.setdefault(row.prompt_id, []).append(row)
    return [grouped[k] for k in sorted(grouped)]


def test_respond_samples_n_answers_per_prompt_through_vllm(tmp_path: Path, model_dir: Path, vllm_calls: list[str]) -> None:
    rows, result = _respond(tmp_path / "a", model_dir, temperature=1.0, top_p=1.0)

    assert vllm_calls == [str(model_dir.resolve())]  # one decode call, on the vLLM engine
    assert result["policy"] == N * len(PROMPTS) and result["rlcd_positive"] == result["rlcd_negative"] == len(PROMPTS)
    groups = _policy_by_prompt(rows)
    assert len(groups) == len(PROMPTS)
    for group in groups:
        assert [r.sample_index for r in group] == list(range(N))
        assert all(0 < r.num_tokens <= 8 for r in group)
        assert len({r.text for r in group}) > 1  # N samples, not one answer repeated
    # The stage seed reproduces every answer.
    again, _ = _respond(tmp_path / "b", model_dir, temperature=1.0, top_p=1.0)
    assert [(r.kind, r.text, r.num_tokens) for r in again] == [(r.kind, r.text, r.num_tokens) for r in rows]


def test_greedy_answers_through_vllm_equal_the_hf_runtimes(tmp_path: Path, model_dir: Path) -> None:
    rows, _ = _respond(tmp_path, model_dir, temperature=0.0)

    hf = ModelRuntime.load(str(model_dir), device="cpu")
    for prompt_text, group in zip(PROMPTS, _policy_by_prompt(rows), strict=True):
        alone = hf.generate([user_prompt(hf, prompt_text, 8)], temperature=0, max_new_tokens=8)[0][0]
        assert {(r.text, r.num_tokens) for r in group} == {(alone.text, alone.num_tokens)}


def test_the_logprob_judge_scores_through_vllm_as_through_hf(tmp_path: Path, model_dir: Path) -> None:
    judges, prompts = {}, []
    for engine in ("hf", "vllm"):
        ctx, _ = lineage_with_responses(tmp_path / engine, model_dir, [(p, ANSWERS) for p in PROMPTS], model={**ENGINE, "engine": engine})
        with ctx.sessions() as session:
            prompts = [judge_prompt(p) for p in prompts_of_role(session, ctx.iteration_id, "train")]
            judges[engine] = stage_judge(ctx, session, "train", parent_checkpoint(ctx, session), seed=0)
    items = [(p, a) for p in prompts for a in ANSWERS]

    assert isinstance(judges["vllm"].runtime(), VllmRuntime) and not isinstance(judges["hf"].runtime(), VllmRuntime)
    scores = {engine: judge.score(items) for engine, judge in judges.items()}
    for hf, vllm in zip(scores["hf"], scores["vllm"], strict=True):
        assert vllm.parse_error is None and vllm.judge == hf.judge
        assert vllm.details["probabilities"] == pytest.approx(hf.details["probabilities"], abs=1e-3)
        assert vllm.details["mass"] == pytest.approx(hf.details["mass"], abs=1e-3)
        assert vllm.value == pytest.approx(hf.value, abs=1e-3)
    pairs = [(p, ANSWERS[0], ANSWERS[1]) for p in prompts]
    verdicts = {engine: judge.compare(pairs) for engine, judge in judges.items()}
    for hf, vllm in zip(verdicts["hf"], verdicts["vllm"], strict=True):
        assert vllm.raw["first_p"] == pytest.approx(hf.raw["first_p"], abs=1e-3)
        assert vllm.raw["second_p"] == pytest.approx(hf.raw["second_p"], abs=1e-3)


@pytest.fixture(scope="module")
def runtimes(model_dir: Path) -> tuple[ModelRuntime, VllmRuntime]:
    return ModelRuntime.load(str(model_dir), device="cpu"), VllmRuntime.load(str(model_dir), kv_cache_gib=0.25)


def test_token_logprobs_through_vllm_equal_the_hf_runtimes(runtimes: tuple[ModelRuntime, VllmRuntime]) -> None:
    hf, vllm = runtimes
    prompts = [user_prompt(hf, p) for p in PROMPTS for _ in ANSWERS]
    answers = ANSWERS * len(PROMPTS)

    found, expected = vllm.token_logprobs(prompts, answers), hf.token_logprobs(prompts, answers)
    assert [len(v) for v in found] == [len(v) for v in expected]
    for values, reference in zip(found, expected, strict=True):
        assert values == pytest.approx(reference, abs=1e-3)
    candidates = ["1", "2", "3"]
    for values, reference in zip(vllm.next_token_distribution(prompts, candidates), hf.next_token_distribution(prompts, candidates), strict=True):
        assert values == pytest.approx(reference, abs=1e-3)


def test_a_stop_string_cuts_the_vllm_answer_where_it_cuts_the_hf_one(runtimes: tuple[ModelRuntime, VllmRuntime]) -> None:
    hf, vllm = runtimes
    prompts = [user_prompt(hf, p) for p in PROMPTS]
    free = hf.generate(prompts, temperature=0, max_new_tokens=16)
    # A stop string from the middle of each greedy answer: text, token count and finished agree.
    for prompt, (answer,) in zip(prompts, free, strict=True):
        stop = answer.text.strip()[3:6]
        assert stop.strip(), answer.text
        expected = hf.generate([prompt], temperature=0, max_new_tokens=16, stop_strings=[stop])[0][0]
        found = vllm.generate([prompt], temperature=0, max_new_tokens=16, stop_strings=[stop])[0][0]
        assert expected.finished and len(expected.text) < len(answer.text)
        assert (found.text, found.num_tokens, found.finished) == (expected.text, expected.num_tokens, expected.finished)
    assert vllm.generate(prompts, temperature=0, max_new_tokens=16) == free


def test_the_end_ramp_of_training_answers_is_refused_with_the_setting_to_change(runtimes: tuple[ModelRuntime, VllmRuntime]) -> None:
    hf, vllm = runtimes
    with pytest.raises(ValueError, match="respond.end_bonus"):
        vllm.generate([user_prompt(hf, PROMPTS[0])], max_new_tokens=8, end_ramp=EndRamp(6.0))


# ---------------------------------------------------------------------- LoRA adapters (last: they start an engine of their own)


@pytest.fixture(scope="module")
def candidates(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA candidates of the tiny model, each with its adapter beside its merged weights."""
    root = tmp_path_factory.mktemp("candidates")
    return [lora_candidate(model_dir, root / f"ckpt-000{seed}", seed=seed) for seed in (1, 2)]


def test_a_checkpoints_adapter_on_its_bases_engine_answers_as_its_merged_weights_on_hf(model_dir: Path, candidates: list[Path]) -> None:
    engine = VllmRuntime.load(str(model_dir), kv_cache_gib=0.25, max_lora_rank=8)
    prompts = [user_prompt(engine, p) for p in PROMPTS]
    base_answers = engine.generate(prompts, temperature=0, max_new_tokens=12)
    llm = engine.llm
    answers = []
    for path in candidates:
        record = checkpoint_adapter(path)
        assert record is not None and record.base == str(model_dir)
        view = engine.with_adapter(lora_adapter(record.path))
        view.load_adapter()
        found = view.generate(prompts, temperature=0, max_new_tokens=12)
        merged = ModelRuntime.load(str(path), device="cpu")
        assert [(a.text, a.num_tokens) for (a,) in found] == [(e.text, e.num_tokens) for (e,) in merged.generate(prompts, temperature=0, max_new_tokens=12)]
        # Scoring through the adapter (one request at a time on a LoRA engine) is the merged model's too.
        for values, reference in zip(view.token_logprobs(prompts, ANSWERS[:3]), merged.token_logprobs(prompts, ANSWERS[:3]), strict=True):
            assert values == pytest.approx(reference, abs=1e-3)
        answers.append(found)
    # Each checkpoint answers as itself: the swap to the second adapter changed the answers, on
    # the same engine (never restarted), and the base model still answers as before.
    assert answers[0] != answers[1] and base_answers not in answers
    assert engine.llm is llm
    assert engine.generate(prompts, temperature=0, max_new_tokens=12) == base_answers
    # Every checkpoint's adapter has a name and id of its own; the same directory keeps its own.
    first, second = (lora_adapter(checkpoint_adapter(p).path) for p in candidates)
    assert first.name != second.name and first.int_id != second.int_id
    assert lora_adapter(candidates[0] / "adapter") == first
