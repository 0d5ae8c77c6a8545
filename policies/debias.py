"""Position-debiased pairwise preferences: the swap average over both orders of a comparison.

A pairwise judge is shown the same two answers twice: X as A and Y as B ("X first"), then Y as
A and X as B ("X second"). From each order we take the judge's preference for X with the tie
mass set aside:

    p_first  = P(A | X first)  / (P(A | X first)  + P(B | X first))
    p_second = P(B | X second) / (P(A | X second) + P(B | X second))

and the debiased preference is their mean, p = (p_first + p_second) / 2. A judge that adds a
constant offset to whichever answer it sees first gives p = 0.5 exactly when it has no
preference, and keeps the sign of a real one: with log-odds s for X and a position offset b,
p - 1/2 = (sigmoid(s + b) - sigmoid(b - s)) / 2, which is zero iff s = 0 and has the sign of s.
The log-odds average (the same thing in logit space) cancels b entirely and returns sigmoid(s);
both are recorded. A verdict needs the preference to clear 1/2 by a margin.

The same functions take sampled verdict letters: "A", "B" and "tie" are read as the
distributions (1, 0, 0), (0, 1, 0) and (0, 0, 1), and an order that is all tie counts 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

VERDICT_FIRST = "a"
VERDICT_SECOND = "b"
VERDICT_TIE = "tie"

# Probabilities are clipped away from 0 and 1 before taking logs: a judge that is certain in
# one order would otherwise make the log-odds average infinite.
_EPSILON = 1e-6

_LETTER_DISTRIBUTIONS = {"A": (1.0, 0.0, 0.0), "B": (0.0, 1.0, 0.0), "tie": (0.0, 0.0, 1.0)}


@dataclass(frozen=True)
class SwapAverage:
    """One comparison of X against Y read in both orders.

    ``preference``: the debiased P(X better than Y). ``first``/``second``: P(X better) in the
    order where X was shown first / second. ``log_odds_preference``: sigmoid of the mean
    log-odds (fully bias-free under a constant logit offset). ``position_preference``: how much
    the judge favoured the answer shown first regardless of content (0.5 = none, 1 = always).
    """

    preference: float
    first: float
    second: float
    log_odds_preference: float
    position_preference: float

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {key: round(value, digits) for key, value in asdict(self).items()}


def preference_in_order(p_a: float, p_b: float) -> float:
    """P(the answer in slot A is better) from the judge's P(A) and P(B), tie mass set aside.

    A judge that put no mass on either letter expressed no preference: 0.5.
    """
    if p_a < 0 or p_b < 0:
        raise ValueError(f"probabilities must be >= 0, got P(A)={p_a}, P(B)={p_b}")
    total = p_a + p_b
    return 0.5 if total <= 0 else p_a / total


def swap_average(x_first: Sequence[float], x_second: Sequence[float]) -> SwapAverage:
    """Debias one comparison from the judge's (P(A), P(B), P(tie)) in both orders.

    ``x_first``: the judge's distribution when X was answer A; ``x_second``: when X was answer B.
    A third entry (tie) may be left out; it never counts for either side.
    """
    first = preference_in_order(x_first[0], x_first[1])
    second = 1.0 - preference_in_order(x_second[0], x_second[1])
    log_odds = (_logit(first) + _logit(second)) / 2
    return SwapAverage(
        preference=(first + second) / 2,
        first=first,
        second=second,
        log_odds_preference=sigmoid(log_odds),
        position_preference=(first + (1.0 - second)) / 2,
    )


def letter_distribution(verdict: str) -> tuple[float, float, float]:
    """A sampled verdict letter as a distribution over (A, B, tie)."""
    try:
        return _LETTER_DISTRIBUTIONS[verdict]
    except KeyError:
        raise ValueError(f"unknown verdict {verdict!r}; expected one of {sorted(_LETTER_DISTRIBUTIONS)}") from None


def verdict(preference: float | None, margin: float) -> str | None:
    """"a" (X better), "b" (Y better) or "tie" when the preference is within ``margin`` of 1/2."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be within [0, 0.5), got {margin}")
    if preference is None:
        return None
    if preference > 0.5 + margin:
        return VERDICT_FIRST
    if preference < 0.5 - margin:
        return VERDICT_SECOND
    return VERDICT_TIE


def position_bias(position_preferences: Iterable[float]) -> float | None:
    """Mean |2 * position_preference - 1| over comparisons: 0 = order never matters, 1 = the
    judge always picks the same slot. None with no comparisons."""
    values = [abs(2 * p - 1) for p in position_preferences]
    return sum(values) / len(values) if values else None


def mean_first_slot_preference(position_preferences: Iterable[float]) -> float | None:
    """Mean position preference (signed: above 0.5 favours the first slot); None when empty."""
    values = list(position_preferences)
    return sum(values) / len(values) if values else None


def summarise(averages: Iterable[SwapAverage]) -> dict[str, Any]:
    """The position-bias metrics of a set of comparisons, for a stage result."""
    slots = [a.position_preference for a in averages]
    return {"position_bias": position_bias(slots), "first_slot_preference": mean_first_slot_preference(slots), "n": len(slots)}


def _logit(p: float) -> float:
    p = min(max(p, _EPSILON), 1 - _EPSILON)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    """The logistic function, overflow-safe (also turns reward differences into preferences)."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
