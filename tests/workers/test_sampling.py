"""Sampling maths: the top-k prefilter leaves nucleus sampling's distribution unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from workers import sampling


def _reference_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' own temperature + top-p warpers (what generation used before), as probabilities."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def _cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = 4096
    peaked = torch.randn(4, vocab, generator=gen) * 4  # nucleus well inside the top 256
    flat = torch.randn(4, vocab, generator=gen) * 0.05  # nucleus wider than 256: full-sort fallback
    mixed = torch.cat([peaked[:2], flat[:2]])
    return [peaked, flat, mixed]


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_prefiltered_top_p_gives_the_same_distribution_as_transformers(top_p: float, temperature: float) -> None:
    for logits in _cases():
        rows = logits.shape[0]
        warped = sampling.warp(logits, torch.full((rows,), temperature), torch.full((rows,), top_p))
        ours = torch.softmax(warped, dim=-1)
        if top_p == 0.0:
            # transformers refuses top_p=0; OpenAI accepts it and it means the single most probable token.
            assert torch.equal(ours.argmax(-1), logits.argmax(-1)) and torch.allclose(ours.max(-1).values, torch.ones(rows))
            continue
        reference = _reference_probs(logits, temperature, top_p)
        assert torch.equal(ours > 0, reference > 0), "a different set of tokens was kept"
        assert torch.allclose(ours, reference, atol=1e-6)


def test_the_flat_rows_really_take_the_fallback_and_the_peaked_rows_do_not() -> None:
    peaked, flat, _ = _cases()
    top_p = torch.full((4,), 0.95)
    assert int(sampling.top_p_mask(peaked, top_p).sum(-1).max()) <= sampling.PREFILTER_K
    assert int(sampling.top_p_mask(flat, top_p).sum(-1).min()) > sampling.PREFILTER_K


def test_sampled_frequencies_match_the_distribution_within_tolerance() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 64, generator=gen) * 2
    warped = sampling.warp(logits, torch.tensor([0.8]), torch.tensor([0.9]))[0]
    expected = torch.softmax(warped, dim=-1)
    draws = 20_000
    rng = sampling.new_generator(123)
    counts = torch.bincount(torch.tensor([sampling.sample_row(warped, rng) for _ in range(draws)]), minlength=64).float()
    observed = counts / draws
    assert float((observed - expected).abs().max()) < 0.015
    assert float(observed[expected == 0].sum()) == 0.0  # nothing outside the nucleus is ever drawn


def test_a_denormal_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    warped = sampling.warp(logits, torch.tensor([1e-300]), torch.tensor([0.9]))
    probs = torch.softmax(warped, dim=-1)
    assert not torch.isnan(probs).any()
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert sampling.is_greedy(1e-300) and not sampling.is_greedy(0.01)


def test_generators_are_reproducible_with_a_seed_and_fresh_without() -> None:
    probs_logits = torch.zeros(1000)
    same = [sampling.sample_row(probs_logits, sampling.new_generator(7)) for _ in range(2)]
    assert same[0] == same[1]
    fresh = {tuple(sampling.sample_row(probs_logits, g) for _ in range(5)) for g in (sampling.new_generator(None) for _ in range(4))}
    assert len(fresh) > 1
    sampling.new_generator(2**64 - 1)  # the largest seed the API accepts is a valid generator seed
    sampling.new_generator(-(2**63))


def test_penalties_follow_openai_formula() -> None:
    logits = torch.zeros(1, 4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = sampling.apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out[0].tolist() == [0.0, -0.75, -1.25, 0.0]
