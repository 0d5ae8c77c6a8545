"""Next-token sampling maths shared by loop generation and the server: temperature, nucleus (top-p)
with a top-k prefilter, OpenAI presence/frequency penalties, the end-of-turn ramp of training
samples (:mod:`policies.end_ramp`), and per-request random generators.

Nucleus sampling keeps the smallest set of most probable tokens whose mass reaches ``top_p``: a
token is kept when the mass of the tokens strictly more probable than it is below ``top_p`` (the
rule of transformers' ``TopPLogitsWarper``). Sorting the whole vocabulary for that (49,152 logits
per row for SmolLM2) was a third of batched-decode CPU. Here each row first takes its ``k`` most
probable tokens with ``topk`` (a partial selection, no full sort): when their mass already reaches
``top_p``, the nucleus lies inside them and is found exactly; only the rows where it does not
(a very flat distribution) fall back to the full sort. The result is the same set of tokens either
way, so the distribution is unchanged (tests/workers/test_sampling.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from policies.end_ramp import EndRamp

PREFILTER_K = 256
"""Candidates taken per row before the nucleus is searched (a flat row falls back to a full sort)."""

GREEDY_BELOW = 1e-5
"""Temperatures under this decode greedily: the limit of sampling as T -> 0, and dividing logits by
a denormal temperature (1e-300 from a client) would otherwise give inf/nan probabilities."""


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def scale_by_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """``logits / T`` per row, computed as ``(logits - max) / T`` so a small T cannot overflow."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted / temperatures.to(logits.dtype).clamp(min=GREEDY_BELOW).unsqueeze(-1)


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor, prefilter_k: int = PREFILTER_K) -> torch.Tensor:
    """Boolean mask (rows x vocab) of the tokens nucleus sampling keeps, at least one per row."""
    vocab = logits.shape[-1]
    active = top_p < 1.0
    if not bool(active.any()):
        return torch.ones_like(logits, dtype=torch.bool)  # top_p == 1 keeps everything: no sort
    k = min(prefilter_k, vocab)
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, indices = torch.topk(logits, k, dim=-1)  # sorted, most probable first
    probs = (values - log_norm).exp()
    mass_above = probs.cumsum(dim=-1) - probs  # mass of the tokens strictly more probable
    kept_in_top_k = mass_above < top_p.unsqueeze(-1)
    kept_in_top_k[:, 0] = True  # top_p == 0 still keeps the most probable token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, indices, kept_in_top_k)
    keep[~active] = True
    outside = active & (probs.sum(dim=-1) < top_p)  # a flat row: the nucleus is wider than k
    for row in outside.nonzero().flatten().tolist():
        keep[row] = False
        keep[row, _nucleus_by_full_sort(logits[row], float(top_p[row]))] = True
    return keep


def _nucleus_by_full_sort(row_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    values, indices = torch.sort(row_logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    kept = (probs.cumsum(dim=-1) - probs) < top_p
    kept[0] = True
    return indices[kept]


def warp(logits: torch.Tensor, temperatures: torch.Tensor, top_p: torch.Tensor, prefilter_k: int = PREFILTER_K) -> torch.Tensor:
    """Temperature then nucleus: the logits to sample from, -inf outside each row's nucleus."""
    scaled = scale_by_temperature(logits, temperatures)
    return scaled.masked_fill(~top_p_mask(scaled, top_p, prefilter_k), float("-inf"))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit -= frequency * count + presence * (count > 0)`` over generated tokens."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own random stream: reproducible with a seed, fresh (OS entropy) without one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return generator


def sample_row(warped: torch.Tensor, generator: torch.Generator) -> int:
    """One token id drawn from ``softmax(warped)`` (a 1-D row of warped logits).

    The draw runs over the nucleus only (the finite entries), not the whole vocabulary: the same
    distribution, without a cumulative sum over 49k zeros (6% of batched decode CPU with SmolLM2)."""
    kept = torch.isfinite(warped).nonzero().flatten()
    if kept.numel() == warped.numel():
        return int(torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=generator))
    probs = torch.softmax(warped.index_select(0, kept), dim=-1)
    return int(kept[torch.multinomial(probs, 1, generator=generator)])


class TemperatureTopPWarper(LogitsProcessor):
    """Temperature and prefiltered top-p for ``model.generate`` (which then samples from the
    returned scores). Used instead of transformers' own warpers, whose top-p sorts every row."""

    def __init__(self, temperature: float, top_p: float, prefilter_k: int = PREFILTER_K) -> None:
        self.temperature, self.top_p, self.prefilter_k = temperature, top_p, prefilter_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        temperatures = torch.full((rows,), self.temperature, device=scores.device)
        top_p = torch.full((rows,), self.top_p, device=scores.device)
        return warp(scores, temperatures, top_p, self.prefilter_k)


def add_end_bonus(scores: torch.Tensor, eos_ids: Sequence[int], bonus: float) -> torch.Tensor:
    """``scores`` with ``bonus`` added to every end-of-turn token's logit (in place)."""
    if bonus:
        scores[..., list(eos_ids)] += bonus
    return scores


class EndRampProcessor(LogitsProcessor):
    """:class:`policies.end_ramp.EndRamp` for ``model.generate``: every row of a chunk has
    generated as many tokens as the chunk (rows are left-padded to one prompt width)."""

    def __init__(self, ramp: EndRamp, eos_ids: Sequence[int], prompt_width: int, budget: int) -> None:
        self.ramp, self.eos_ids, self.prompt_width, self.budget = ramp, list(eos_ids), prompt_width, budget

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bonus = self.ramp.bonus_at(input_ids.shape[1] - self.prompt_width, self.budget)
        return add_end_bonus(scores.clone(), self.eos_ids, bonus) if bonus else scores
