"""How far the loop can trust its own judge: per-iteration metrics and the warnings they raise.

A self-rewarding loop trains on its judge's opinions, so a judge that drifts (stops parsing,
contradicts itself, follows the answer's position or length) silently turns training into
noise or into reward hacking. These pure functions measure that on each iteration's data;
the stages store the numbers in their results under ``judge_metrics`` and raise a warning
event when a threshold is crossed.

Every metric returns None when its inputs cannot support it (no data, a single point, zero
variance): an undefined number is not reported as a reassuring 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

JUDGE_METRICS_KEY = "judge_metrics"
"""The key under which the judge, build_pairs and evaluate_gate stages store their metrics."""

WARNING_EVENT_KIND = "judge_warning"

# Verdict letters (policies.rubric) of a position-consistent judge: the same answer wins in
# both orders, so the letter changes, or both orders call it a tie.
_CONSISTENT_ORDERS = frozenset({("A", "B"), ("B", "A"), ("tie", "tie")})


def parse_failure_rate(scores: Sequence[float | None]) -> float | None:
    """Share of judge samples whose score could not be read (None); None when there are none."""
    if not scores:
        return None
    return sum(score is None for score in scores) / len(scores)


def sample_agreement(samples_per_response: Iterable[Sequence[float | None]], tolerance: float = 0.5) -> float | None:
    """Self-agreement over the K judge samples of each response.

    Over every pair of parsed samples of the same response (pairs never mix responses), the
    share whose scores differ by at most ``tolerance``; with whole-number scores the default
    0.5 means "the same score". Responses with fewer than two parsed samples contribute no
    pair; None when no response has two.
    """
    agreeing = total = 0
    for samples in samples_per_response:
        parsed = [s for s in samples if s is not None]
        for first, second in combinations(parsed, 2):
            total += 1
            agreeing += abs(first - second) <= tolerance
    return agreeing / total if total else None


def distribution_agreement(distributions: Iterable[Sequence[float]]) -> float | None:
    """Self-agreement of a judge read as a probability distribution over scores.

    The probability that two independent samples from a response's score distribution give
    the same score (sum of p_i^2), averaged over responses: the same quantity as
    :func:`sample_agreement` with whole-number scores, computed exactly instead of from K
    draws. A distribution is renormalised first; None when there are none.
    """
    values = []
    for distribution in distributions:
        total = sum(distribution)
        if total <= 0:
            raise ValueError(f"a score distribution must have positive mass, got {list(distribution)}")
        values.append(sum((p / total) ** 2 for p in distribution))
    return sum(values) / len(values) if values else None


def position_bias_rate(verdict_pairs: Iterable[tuple[str | None, str | None]]) -> float | None:
    """How often swapping the order of two answers changes the judge's verdict.

    Each item is (verdict with the candidate shown as A, verdict with the champion shown as A),
    letters "A", "B" or "tie". A consistent judge gives ("A", "B"), ("B", "A") or ("tie", "tie");
    anything else (the same letter twice, or a tie in one order only) means the verdict followed
    the position. Comparisons with an unreadable order are left out; None when none is left.
    """
    readable = [(first, second) for first, second in verdict_pairs if first is not None and second is not None]
    if not readable:
        return None
    return sum(pair not in _CONSISTENT_ORDERS for pair in readable) / len(readable)


def pearson_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r of two equally long sequences; None with fewer than 3 points or no variance."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 3:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    if var_x == 0 or var_y == 0:
        return None
    return cov / math.sqrt(var_x * var_y)


def score_length_correlation(scored: Iterable[tuple[float | None, float]]) -> float | None:
    """Correlation of a response's mean judge score with its length; unscored responses are left out."""
    points = [(score, length) for score, length in scored if score is not None]
    return pearson_correlation([s for s, _ in points], [length for _, length in points])


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pair_gaps(pairs: Iterable[tuple[float | None, float, float]]) -> dict[str, float | None]:
    """Mean chosen-minus-rejected score gap and length gap over the training pairs.

    Each item is (score gap or None, chosen length, rejected length). RLCD pairs have no score
    gap, so the score mean runs over the pairs that have one and the length mean over all.
    """
    items = list(pairs)
    return {
        "mean_score_gap": mean_or_none(gap for gap, _, _ in items),
        "mean_length_gap": mean_or_none(chosen - rejected for _, chosen, rejected in items),
    }


def shrinking_streak(values: Sequence[float | None]) -> int:
    """How many times in a row, counting back from the last value, a value fell below the one before.

    ``[0.9, 0.8, 0.85, 0.7, 0.6]`` gives 2. A None (an iteration without the metric) ends the
    streak: a gap that was not measured cannot be said to have shrunk.
    """
    streak = 0
    for index in range(len(values) - 1, 0, -1):
        current, previous = values[index], values[index - 1]
        if current is None or previous is None or not current < previous:
            break
        streak += 1
    return streak


# ---------------------------------------------------------------- warnings


@dataclass(frozen=True)
class WarningThresholds:
    """When a judge metric is worth a warning event; None switches a check off."""

    max_length_correlation: float | None = 0.5
    score_gap_shrinking_iterations: int | None = 3
    max_parse_failure_rate: float | None = 0.5
    max_position_bias_rate: float | None = 0.5
    min_self_agreement: float | None = None


def judge_warnings(
    metrics: Mapping[str, Any],
    thresholds: WarningThresholds,
    score_gap_history: Sequence[float | None] = (),
) -> list[str]:
    """One readable line per threshold ``metrics`` crosses; checks whose metric is absent are skipped.

    ``score_gap_history`` is the mean score gap of the earlier iterations, oldest first; this
    iteration's ``mean_score_gap`` (if in ``metrics``) is appended to it for the streak check.
    """
    lines = []
    correlation = metrics.get("length_correlation")
    if _above(correlation, thresholds.max_length_correlation):
        lines.append(
            f"judge score correlates with response length (r={correlation:.2f} > {thresholds.max_length_correlation:g}): "
            "the judge may reward length; consider pairs.max_length_ratio or pairs.length_normalise"
        )
    failures = metrics.get("parse_failure_rate")
    if _above(failures, thresholds.max_parse_failure_rate):
        lines.append(
            f"judge parse-failure rate {failures:.0%} > {thresholds.max_parse_failure_rate:.0%}: "
            "most judgments are unreadable; consider judge.mode: logprob"
        )
    bias = metrics.get("position_bias_rate")
    if _above(bias, thresholds.max_position_bias_rate):
        lines.append(
            f"gate verdicts follow the answer's position in {bias:.0%} of comparisons "
            f"(> {thresholds.max_position_bias_rate:.0%}): the pairwise judge is unreliable"
        )
    agreement = metrics.get("self_agreement")
    if agreement is not None and thresholds.min_self_agreement is not None and agreement < thresholds.min_self_agreement:
        lines.append(f"judge self-agreement {agreement:.2f} < {thresholds.min_self_agreement:g}: the judge contradicts itself")
    if "mean_score_gap" in metrics and thresholds.score_gap_shrinking_iterations is not None:
        history = [*score_gap_history, metrics["mean_score_gap"]]
        streak = shrinking_streak(history)
        if streak >= thresholds.score_gap_shrinking_iterations:
            recent = ", ".join(f"{v:.2f}" for v in history[-(streak + 1) :] if v is not None)
            lines.append(
                f"mean chosen-rejected score gap shrank {streak} iterations in a row ({recent}): "
                "the judge separates answers less and less"
            )
    return lines


def _above(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value > limit


# ---------------------------------------------------------------- lineage read-out


def iteration_judge_metrics(stage_results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The judge metrics of one iteration, gathered from its stage results (stage name -> result)."""
    merged: dict[str, Any] = {}
    for result in stage_results.values():
        merged.update(result.get(JUDGE_METRICS_KEY) or {})
    return merged


def rounded(metrics: Mapping[str, float | None], digits: int = 4) -> dict[str, float | None]:
    """JSON-ready copy: floats rounded, None kept."""
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in metrics.items()}
