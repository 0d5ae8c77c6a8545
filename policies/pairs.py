"""Preference pairs for DPO, from self-judged scores or from RLCD contrastive sampling."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

KIND_SELF_REWARD = "self_reward"
KIND_RLCD = "rlcd"
PAIR_STRATEGIES: tuple[str, ...] = ("self_reward", "rlcd", "both")


@dataclass(frozen=True)
class ScoredResponse:
    """One sampled answer with its judge score averaged over the parsed judge samples;
    `mean_score` is None when no judge sample parsed."""

    response_id: str
    text: str
    mean_score: float | None


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
