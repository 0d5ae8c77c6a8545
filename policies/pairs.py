"""Preference pairs for DPO, from self-judged scores or from RLCD contrastive sampling.

Length control: judges (small ones especially) tend to prefer longer answers, and DPO learns
whatever separates chosen from rejected, so a length bias in the judge becomes a length bias in
the model. Two optional defences: :func:`length_normalised` removes the part of the scores that
length explains before pairs are picked, and :func:`cap_length_ratio` drops pairs whose chosen
answer is too many times longer than the rejected one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

KIND_SELF_REWARD = "self_reward"
KIND_RLCD = "rlcd"
PAIR_STRATEGIES: tuple[str, ...] = ("self_reward", "rlcd", "both")


@dataclass(frozen=True)
class ScoredResponse:
    """One sampled answer with its judge score averaged over the parsed judge samples;
    `mean_score` is None when no judge sample parsed. `length` is its length in tokens."""

    response_id: str
    text: str
    mean_score: float | None
    length: int = 0


@dataclass(frozen=True)
class PreferencePair:
    prompt_id: str
    chosen_id: str
    rejected_id: str
    kind: str  # KIND_SELF_REWARD or KIND_RLCD
    score_gap: float | None  # chosen minus rejected mean score; None for RLCD


@dataclass(frozen=True)
class RlcdSample:
    """The two RLCD answers to one prompt. An id or text is None when that side was
    never sampled or failed; such a sample yields no pair."""

    prompt_id: str
    positive_id: str | None
    positive_text: str | None
    negative_id: str | None
    negative_text: str | None


def build_self_reward_pairs(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    min_gap: float,
) -> list[PreferencePair]:
    """Per prompt, the best-scored answer as chosen and the worst as rejected.

    Answers without a score take no part. A prompt gives no pair when fewer than two
    answers are scored, when the gap is below `min_gap` or zero (a tie teaches nothing
    but noise), or when best and worst are the same text (judge noise, no signal).
    Ties within the best or the worst are broken by the smaller response_id so reruns
    give the same pairs. Pairs come in the mapping's prompt order.
    """
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    pairs: list[PreferencePair] = []
    for prompt_id, responses in responses_by_prompt.items():
        pair = _self_reward_pair(prompt_id, responses, min_gap)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _self_reward_pair(
    prompt_id: str,
    responses: Sequence[ScoredResponse],
    min_gap: float,
) -> PreferencePair | None:
    scored = [r for r in responses if r.mean_score is not None]
    if len(scored) < 2:
        return None
    chosen = min(scored, key=lambda r: (-_score(r), r.response_id))
    rejected = min(scored, key=lambda r: (_score(r), r.response_id))
    gap = _score(chosen) - _score(rejected)
    if gap <= 0 or gap < min_gap or chosen.text.strip() == rejected.text.strip():
        return None
    return PreferencePair(prompt_id, chosen.response_id, rejected.response_id, KIND_SELF_REWARD, gap)


def _score(response: ScoredResponse) -> float:
    assert response.mean_score is not None  # callers filter unscored answers first
    return response.mean_score


def build_rlcd_pairs(samples: Iterable[RlcdSample]) -> list[PreferencePair]:
    """One pair per usable sample, in input order: positive chosen, negative rejected.

    Takes `RlcdSample`s rather than a prompt_id -> (ids) mapping because the texts are
    needed to drop identical answers: when both prompts produced the same text the pair
    carries no contrast. Samples missing either side are skipped.
    """
    return [
        PreferencePair(s.prompt_id, s.positive_id, s.negative_id, KIND_RLCD, None)
        for s in samples
        if s.positive_id is not None and s.negative_id is not None and _texts_differ(s)
    ]


def _texts_differ(sample: RlcdSample) -> bool:
    positive = (sample.positive_text or "").strip()
    negative = (sample.negative_text or "").strip()
    return bool(positive) and bool(negative) and positive != negative


def select_pairs(
    strategy: str,
    self_reward_pairs: Sequence[PreferencePair],
    rlcd_pairs: Sequence[PreferencePair],
) -> list[PreferencePair]:
    """The pairs a cycle trains on under `strategy` (one of PAIR_STRATEGIES); "both"
    gives the self-reward pairs followed by the RLCD pairs."""
    if strategy == "self_reward":
        return list(self_reward_pairs)
    if strategy == "rlcd":
        return list(rlcd_pairs)
    if strategy == "both":
        return [*self_reward_pairs, *rlcd_pairs]
    allowed = ", ".join(repr(s) for s in PAIR_STRATEGIES)
    raise ValueError(f"unknown pair strategy {strategy!r}; allowed: {allowed}")


# --- Length control -------------------------------------------------------------------


def length_score_slope(responses_by_prompt: Mapping[str, Sequence[ScoredResponse]]) -> float:
    """Judge-score points per token of answer length, compared within each prompt.

    The pooled within-prompt least-squares slope: sum over prompts of
    (length - prompt mean length) * (score - prompt mean score), divided by the sum of squared
    length deviations. Within-prompt, because pairs are made within a prompt and prompts
    differ in how long a good answer is. 0.0 when no prompt has two scored answers of
    different lengths.
    """
    covariance = variance = 0.0
    for responses in responses_by_prompt.values():
        scored = [r for r in responses if r.mean_score is not None]
        if len(scored) < 2:
            continue
        mean_length = sum(r.length for r in scored) / len(scored)
        mean_score = sum(_score(r) for r in scored) / len(scored)
        covariance += sum((r.length - mean_length) * (_score(r) - mean_score) for r in scored)
        variance += sum((r.length - mean_length) ** 2 for r in scored)
    return covariance / variance if variance > 0 else 0.0


def length_normalised(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
) -> dict[str, list[ScoredResponse]]:
    """The same answers with the length effect taken out of their scores.

    Each score becomes score - slope * (length - mean length of the prompt's scored answers),
    with the slope of :func:`length_score_slope`: what is left is the judge's opinion at equal
    length. Only differences within a prompt matter to pairing, so the scores are not clamped
    back into [1, 5]. Unscored answers stay unscored.
    """
    slope = length_score_slope(responses_by_prompt)
    adjusted: dict[str, list[ScoredResponse]] = {}
    for prompt_id, responses in responses_by_prompt.items():
        scored = [r for r in responses if r.mean_score is not None]
        mean_length = sum(r.length for r in scored) / len(scored) if scored else 0.0
        adjusted[prompt_id] = [
            r if r.mean_score is None else replace(r, mean_score=r.mean_score - slope * (r.length - mean_length))
            for r in responses
        ]
    return adjusted


def cap_length_ratio(
    pairs: Sequence[PreferencePair],
    lengths: Mapping[str, int],
    max_ratio: float,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(kept, dropped): a pair is dropped when its chosen answer is more than ``max_ratio``
    times as long as its rejected one (a longer rejected answer is never a reason to drop).

    ``lengths`` maps response ids to token counts; every id in ``pairs`` must be there. A
    non-empty chosen answer against an empty rejected one counts as infinitely longer.
    """
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (a chosen answer may always be as long as the rejected one), got {max_ratio}")
    kept: list[PreferencePair] = []
    dropped: list[PreferencePair] = []
    for pair in pairs:
        chosen, rejected = lengths[pair.chosen_id], lengths[pair.rejected_id]
        (dropped if chosen > max_ratio * rejected else kept).append(pair)
    return kept, dropped
