"""Shared-prefix KV reuse gives the probabilities an unshared pass gives (tiny models, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import rubric
from workers import scoring
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
    original = scoring.encode_prefix

    def counting(model, ids, device, argument):  # type: ignore[no-untyped-def]
        lengths.append(len(ids))
        return original(model, ids, device, argument)

    monkeypatch.setattr(scoring, "encode_prefix", counting)
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
    assert len(prefix_passes) == 1 and prefix_passes[0] >= scoring.MIN_SHARED_PREFIX
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
