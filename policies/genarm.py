"""GenARM's pure math: the autoregressive reward, its Bradley–Terry loss, and guided next-token scores.

An autoregressive reward model (ARM) ``π_r`` scores a completion token by token:

    r(x, y) = β · Σ_t log π_r(y_t | x, y_<t)

and is trained on preference pairs with the Bradley–Terry loss ``−log σ(r(x, y_c) − r(x, y_r))``.
Guided decoding samples each token from

    log p(y_t) ∝ log p_base(y_t) + (1/β) · Σ_i w_i · log p_arm_i(y_t)

Weights are finite and **non-negative** (a weight of 0 switches a reward model off). A negative
weight is refused on purpose: ``−w · log p_arm`` does not mean "the opposite preference", it
rewards whatever the ARM finds *implausible* (unrelated tokens, broken text), since those have the
most negative log-probs. The opposite preference is a separate ARM trained on the swapped pairs.

Everything here is free of I/O and model loading: functions on torch tensors and plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GuidanceError",
    "align_vocab_width",
    "arm_reward",
    "bradley_terry_loss",
    "guidance_delta",
    "guided_scores",
    "pair_accuracy",
    "truncate_prompt_completion",
    "validate_beta",
    "validate_weights",
    "vocabulary_differences",
]


class GuidanceError(ValueError):
    """Invalid guidance parameters (β, weights, shapes); the message says what to change."""


# --------------------------------------------------------------------------- validation


def validate_beta(beta: float) -> float:
    """β must be a finite number > 0: it scales the reward and divides the ARM log-probs."""
    value = float(beta)
    if not math.isfinite(value) or value <= 0:
        raise GuidanceError(f"beta must be a finite number > 0 (it divides the reward log-probs), got {beta!r}")
    return value


def validate_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Every weight finite and >= 0 (see the module docstring for why negative weights are refused)."""
    checked = []
    for index, weight in enumerate(weights):
        value = float(weight)
        if not math.isfinite(value):
            raise GuidanceError(f"reward model weight #{index} must be finite, got {weight!r}")
        if value < 0:
            raise GuidanceError(
                f"reward model weight #{index} is {value}; weights must be >= 0. A negative weight rewards tokens "
                "the reward model finds implausible, not the opposite preference: to steer away from a preference, "
                "train a reward model on the swapped pairs and give it a positive weight."
            )
        checked.append(value)
    return tuple(checked)


# --------------------------------------------------------------------------- training math


def arm_reward(completion_logprob_sums: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = β · Σ_t log π_r(y_t | x, y_<t), from the per-sequence sums of completion log-probs."""
    return validate_beta(beta) * completion_logprob_sums


def bradley_terry_loss(chosen_logprob_sums: torch.Tensor, rejected_logprob_sums: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of −log σ(r(x, y_c) − r(x, y_r)) over the pairs (differentiable)."""
    if chosen_logprob_sums.shape != rejected_logprob_sums.shape:
        raise GuidanceError(
            f"chosen and rejected scores must pair up one to one, got shapes "
            f"{tuple(chosen_logprob_sums.shape)} and {tuple(rejected_logprob_sums.shape)}"
        )
    margin = arm_reward(chosen_logprob_sums, beta) - arm_reward(rejected_logprob_sums, beta)
    return -F.logsigmoid(margin).mean()


def pair_accuracy(chosen_logprob_sums: torch.Tensor, rejected_logprob_sums: torch.Tensor) -> float:
    """Fraction of pairs whose chosen answer gets the strictly higher reward (ties count as misses)."""
    if chosen_logprob_sums.numel() == 0:
        raise GuidanceError("pair accuracy needs at least one pair")
    return float((chosen_logprob_sums > rejected_logprob_sums).float().mean().item())


def truncate_prompt_completion(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit a (prompt, completion) pair into ``max_length`` tokens.

    The completion is what the reward scores, so it keeps up to ``max_length − min(len(prompt),
    max_length // 2)`` of its first tokens; the prompt then keeps its *last* tokens (the ones
    nearest the answer) in the remaining room.
    """
    if max_length < 2:
        raise GuidanceError(f"max_length must be >= 2 (one prompt and one completion token), got {max_length}")
    prompt, completion = list(prompt_ids), list(completion_ids)
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    completion = completion[: max_length - min(len(prompt), max_length // 2)]
    room = max_length - len(completion)
    return (prompt[-room:] if room > 0 else []), completion


# --------------------------------------------------------------------------- decoding math


def align_vocab_width(logprobs: torch.Tensor, width: int) -> torch.Tensor:
    """Make ARM log-probs ``[batch, V_arm]`` as wide as the base model's scores ``[batch, width]``.

    Models sharing a tokenizer can still have different logit widths (embedding matrices padded to
    a multiple of 64 or 128). Columns past the shorter width are not tokens of the shared
    tokenizer: extra ARM columns are dropped, and missing ones get log-prob −inf (the ARM never
    proposes them; with weight 0 they are not used at all).
    """
    current = logprobs.shape[-1]
    if current == width:
        return logprobs
    if current > width:
        return logprobs[..., :width]
    pad = logprobs.new_full((*logprobs.shape[:-1], width - current), float("-inf"))
    return torch.cat([logprobs, pad], dim=-1)


def guidance_delta(arm_logprobs: Sequence[torch.Tensor], weights: Sequence[float], beta: float) -> torch.Tensor:
    """(1/β) · Σ_i w_i · log p_arm_i, skipping zero weights exactly (0 · −inf would be NaN).

    ``arm_logprobs`` are normalised log-probs, all of one shape ``[batch, vocab]``.
    """
    if not arm_logprobs:
        raise GuidanceError("guidance needs at least one reward model's log-probs")
    if len(arm_logprobs) != len(weights):
        raise GuidanceError(f"{len(arm_logprobs)} reward models but {len(weights)} weights")
    shapes = {tuple(lp.shape) for lp in arm_logprobs}
    if len(shapes) != 1:
        raise GuidanceError(f"reward model log-probs have different shapes {sorted(shapes)}; align their vocab widths first")
    scale = 1.0 / validate_beta(beta)
    delta = torch.zeros_like(arm_logprobs[0])
    for logprobs, weight in zip(arm_logprobs, validate_weights(weights), strict=True):
        if weight != 0.0:
            delta = delta + (weight * scale) * logprobs
    return delta


def guided_scores(base_scores: torch.Tensor, arm_logprobs: Sequence[torch.Tensor], weights: Sequence[float], beta: float) -> torch.Tensor:
    """Base next-token scores plus the guidance.

    ``base_scores`` may be raw logits or log-probs: they differ by a per-row constant, which the
    softmax of the sampler removes, so adding the guidance to raw logits yields exactly the
    distribution log p_base + (1/β) Σ w_i log p_arm_i — and leaves the logits bit-for-bit
    unchanged when every weight is 0.
    """
    delta = guidance_delta(arm_logprobs, weights, beta)
    if delta.shape != base_scores.shape:
        raise GuidanceError(
            f"base scores {tuple(base_scores.shape)} and reward log-probs {tuple(delta.shape)} differ in shape; "
            "align the reward log-probs to the base vocab width first"
        )
    return base_scores + delta


# --------------------------------------------------------------------------- tokenizer comparison


def vocabulary_differences(base_vocab: Mapping[str, int], reward_vocab: Mapping[str, int], *, limit: int = 5) -> list[str]:
    """Human-readable differences between two token → id maps (empty when identical)."""
    differences = []
    if len(base_vocab) != len(reward_vocab):
        differences.append(f"vocabulary sizes {len(base_vocab)} vs {len(reward_vocab)}")
    only_base = sorted(set(base_vocab) - set(reward_vocab), key=base_vocab.__getitem__)
    only_reward = sorted(set(reward_vocab) - set(base_vocab), key=reward_vocab.__getitem__)
    if only_base:
        differences.append(f"{len(only_base)} tokens only in the base, e.g. {only_base[:limit]!r}")
    if only_reward:
        differences.append(f"{len(only_reward)} tokens only in the reward model, e.g. {only_reward[:limit]!r}")
    moved = sorted((t for t in set(base_vocab) & set(reward_vocab) if base_vocab[t] != reward_vocab[t]), key=base_vocab.__getitem__)
    if moved:
        examples = ", ".join(f"{t!r}: {base_vocab[t]} vs {reward_vocab[t]}" for t in moved[:limit])
        differences.append(f"{len(moved)} tokens with different ids, e.g. {examples}")
    return differences
