"""Shared-prefix KV reuse gives the probabilities an unshared pass gives (tiny models, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import rubric
from workers import prefix_cache, scoring
from workers.judges.self_text import judge_requests
from workers.runtime import ModelRuntime
from workers.tiny_model import ARCHITECTURES, build_tiny_model

ITEMS = [
    ("hi", "hello"),
    ("Write a short poem about the sea.", "The sea is wide, the sea is deep, and in its arms the sailors sleep."),
    ("Explain how photosynthesis works", "Plants turn light into sugar."),
    ("What is a tuple in Python?", "An immutable sequence, such as (1, 2). Unlike a list, it cannot change once made."),
    ("Name a colour.", "Blue"),
    ("Count to five.", "one two three four five"),
    ("hi", "Hello! How can I help you today? I can answer questions, write text and more."),
]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runtime(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    # An untied, scaled output layer: a random model's next-token distribution is then far from
    # uniform, so a wrong position or mask would move the probabilities visibly.
    path = build_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param, tie_embeddings=False, output_scale=6.0)
    return ModelRuntime.load(str(path), device="cpu")


@pytest.fixture
def prefix_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every shared prefix the runtime encoded."""
    lengths: list[int] = []
    original = prefix_cache.encode_prefix

    def counting(model, ids, device, argument):  # type: ignore[no-untyped-def]
        lengths.append(len(ids))
        return original(model, ids, device, argument)

    monkeypatch.setattr(prefix_cache, "encode_prefix", counting)
    return lengths


def _max_abs_diff(shared: list[scoring.ContinuationDistribution], unshared: list[scoring.ContinuationDistribution]) -> float:
    return max(abs(a - b) for s, u in zip(shared, unshared, strict=True) for a, b in zip(s.probabilities + [s.mass], u.probabilities + [u.mass], strict=True))


def _score_cues(runtime: ModelRuntime) -> list[str]:
    contents = [rubric.render_judge_prompt(prompt, answer) for prompt, answer in ITEMS]
    return [request + rubric.SCORE_CUE for request in judge_requests(runtime, contents)]


def _verdict_cues(runtime: ModelRuntime) -> list[str]:
    contents = [rubric.render_pairwise_prompt(ITEMS[i][0], ITEMS[i][1], ITEMS[i + 1][1]) for i in range(len(ITEMS) - 1)]
    return [request + rubric.VERDICT_CUE for request in judge_requests(runtime, contents)]


@pytest.mark.parametrize(("cues", "continuations"), [(_score_cues, rubric.SCORE_CONTINUATIONS), (_verdict_cues, rubric.VERDICT_CONTINUATIONS)], ids=["score", "pairwise"])
def test_reused_rubric_prefix_gives_the_unshared_probabilities(runtime: ModelRuntime, prefix_passes: list[int], cues, continuations) -> None:  # type: ignore[no-untyped-def]
    texts = cues(runtime)
    suffix_lengths = {len(runtime.context_ids(t)) for t in texts}
    assert len(suffix_lengths) > 2  # the padded suffixes really differ in length within a chunk

    # batch_size 3 over 6-7 contexts: several chunks, each a copy of the one prefix cache.
    shared = runtime.continuation_distribution(texts, continuations, batch_size=3)
    assert len(prefix_passes) == 1 and prefix_passes[0] >= prefix_cache.MIN_SHARED_PREFIX
    unshared = runtime.continuation_distribution(texts, continuations, batch_size=3, share_prefix=False)
    assert len(prefix_passes) == 1  # the reference really ran without reuse

    assert _max_abs_diff(shared, unshared) < 1e-4
    # The reuse must not hide a broken model behind equal garbage: the choices differ by context.
    assert len({tuple(round(p, 3) for p in d.probabilities) for d in shared}) > 1


def test_one_context_per_row_order_is_kept(runtime: ModelRuntime) -> None:
    texts = _score_cues(runtime)
    one_by_one = [runtime.continuation_distribution([t], rubric.SCORE_CONTINUATIONS, share_prefix=False)[0] for t in texts]
    together = runtime.continuation_distribution(texts, rubric.SCORE_CONTINUATIONS, batch_size=4)
    assert _max_abs_diff(together, one_by_one) < 1e-4


def test_contexts_without_a_long_shared_prefix_are_scored_whole(runtime: ModelRuntime, prefix_passes: list[int]) -> None:
    texts = ["Score:", "A different opening entirely. Score:"]
    shared = runtime.continuation_distribution(texts, rubric.SCORE_CONTINUATIONS)
    unshared = runtime.continuation_distribution(texts, rubric.SCORE_CONTINUATIONS, share_prefix=False)
    assert prefix_passes == []
    assert _max_abs_diff(shared, unshared) == 0.0


# ------------------------------------------------------------------ token_logprobs, next_token_distribution

PREAMBLE = "Answer the question helpfully and honestly. Be concise, accurate and polite.\n\nQuestion: "


def _max_list_diff(shared: list[list[float]], unshared: list[list[float]]) -> float:
    assert [len(s) for s in shared] == [len(u) for u in unshared]
    return max((abs(a - b) for s, u in zip(shared, unshared, strict=True) for a, b in zip(s, u, strict=True)), default=0.0)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_token_logprobs_after_a_shared_prompt_prefix_equal_the_unshared_ones(runtime: ModelRuntime, prefix_passes: list[int], batch_size: int) -> None:
    prompts = [PREAMBLE + prompt for prompt, _ in ITEMS] + [PREAMBLE + "hi"]
    completions = [answer for _, answer in ITEMS] + [""]  # ragged completions, and one with no tokens
    shortest_prompt = min(len(runtime.context_ids(p)) for p in prompts)

    shared = runtime.token_logprobs(prompts, completions, batch_size=batch_size)
    # One prefix for the whole call, cut before the shortest prompt's last token (whose logits
    # predict its completion's first token).
    assert len(prefix_passes) == 1 and prefix_cache.MIN_SHARED_PREFIX <= prefix_passes[0] < shortest_prompt
    unshared = runtime.token_logprobs(prompts, completions, batch_size=batch_size, share_prefix=False)
    assert len(prefix_passes) == 1

    assert shared[-1] == [] and all(shared[:-1])
    assert _max_list_diff(shared, unshared) <= 1e-4
    totals = runtime.sequence_logprobs(prompts, completions, batch_size=batch_size)
    assert totals == pytest.approx([sum(u) for u in unshared], abs=1e-3)
    assert len(prefix_passes) == 2  # sequence_logprobs shares it too


def test_a_whole_prompt_shared_by_every_pair_still_scores_its_first_completion_token(runtime: ModelRuntime, prefix_passes: list[int]) -> None:
    # The implicit judge's compare: one prompt, two answers; the prompts share all their tokens.
    prompts = [PREAMBLE + "Name a colour."] * 2
    completions = ["Blue", "A colour such as red, or green."]
    shared = runtime.token_logprobs(prompts, completions)
    unshared = runtime.token_logprobs(prompts, completions, share_prefix=False)
    assert prefix_passes == [len(runtime.context_ids(prompts[0])) - 1]
    assert _max_list_diff(shared, unshared) <= 1e-4


@pytest.mark.parametrize("batch_size", [1, 4])
def test_next_token_distribution_after_a_shared_prefix_equals_the_unshared_one(runtime: ModelRuntime, prefix_passes: list[int], batch_size: int) -> None:
    prompts = [PREAMBLE + prompt + "\nScore:" for prompt, _ in ITEMS]
    candidates = [" 1", " 2", " 3", " 4", " 5"]
    shared = runtime.next_token_distribution(prompts, candidates, batch_size=batch_size)
    assert len(prefix_passes) == 1 and prefix_passes[0] >= prefix_cache.MIN_SHARED_PREFIX
    unshared = runtime.next_token_distribution(prompts, candidates, batch_size=batch_size, share_prefix=False)
    assert _max_list_diff(shared, unshared) <= 1e-4
    assert len({tuple(round(p, 3) for p in d) for d in shared}) > 1


def test_scoring_without_a_long_shared_prefix_runs_whole(runtime: ModelRuntime, prefix_passes: list[int]) -> None:
    prompts = ["Score:", "A different opening entirely. Score:", "Score: the same few tokens"]
    assert prefix_cache.shared_prefix_length([runtime.context_ids(p) for p in prompts]) < prefix_cache.MIN_SHARED_PREFIX
    completions = [" 4", " five", " and then some more"]
    assert runtime.token_logprobs(prompts, completions) == runtime.token_logprobs(prompts, completions, share_prefix=False)
    assert runtime.next_token_distribution(prompts, [" 1", " 2"]) == runtime.next_token_distribution(prompts, [" 1", " 2"], share_prefix=False)
    assert prefix_passes == []


def test_the_implicit_judge_on_a_urial_model_encodes_the_preamble_once(tmp_path: Path, prefix_passes: list[int]) -> None:
    from tests.factories import small_cycle_settings
    from workers.judges import build_judge

    base = build_tiny_model(tmp_path / "base", chat_template=None, tie_embeddings=False, output_scale=6.0)
    runtime = ModelRuntime.load(str(base), device="cpu")
    assert runtime.profile.prompt_format == "urial"
    settings = small_cycle_settings(tmp_path, base, judge={"implicit": {"beta": 0.1}}, generation={"batch_size": 3})
    judge = build_judge(
        settings, "train", policy_path=str(base), initial_path=str(base), load_model=lambda path: runtime, backends=["implicit"],
    )
    items = ITEMS[:5]
    scores = judge.score(items)
    # The policy is its own reference: one scoring call, one encoded prefix, the URIAL preamble.
    preamble = prefix_cache.shared_prefix_length([runtime.context_ids(runtime.render_chat([{"role": "user", "content": p}])) for p, _ in items])
    assert preamble > 500 and prefix_passes == [preamble]
    prompts = [runtime.render_chat([{"role": "user", "content": p}]) for p, _ in items]
    reference = runtime.sequence_logprobs(prompts, [a for _, a in items], share_prefix=False)
    assert [s.details["policy_logprob"] for s in scores] == pytest.approx(reference, abs=1e-3)
