"""Statistics for suite results: intervals on a score, paired differences, power.

A suite score is a proportion over items (or a mean of per-item scores in [0, 1]); two
checkpoints evaluated on the same items are compared item by item (paired), which removes
the variance that comes from which items happen to be hard.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import NormalDist


def z_for(confidence: float) -> float:
    """The two-sided normal quantile for `confidence` (1.96 at 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def proportion_ci(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for successes / n. Works for fractional successes (a mean of
    per-item scores times n). (0, 1) when n == 0: no evidence narrows it."""
    if n < 0 or not 0.0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = z_for(confidence)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 or n successes the bound is exactly 0 or 1; float rounding would leave 1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - margin)
    high = 1.0 if successes == n else min(1.0, centre + margin)
    return low, high


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default "linear" method).
    position = q * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1 - weight) + sorted_values[upper] * weight


def paired_bootstrap(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the observed difference and its percentile bootstrap
    interval, resampling items (the same index for both lists) with replacement.

    `a_scores[i]` and `b_scores[i]` must be the two checkpoints' scores on the same item.
    Deterministic for a given `seed`.
    """
    if len(a_scores) != len(b_scores):
        raise ValueError(f"paired scores need equal lengths, got {len(a_scores)} and {len(b_scores)}")
    if not a_scores:
        raise ValueError("paired_bootstrap needs at least one item")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    z_for(confidence)  # validates
    differences = [float(a) - float(b) for a, b in zip(a_scores, b_scores, strict=True)]
    n = len(differences)
    observed = sum(differences) / n
    rng = random.Random(seed)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    alpha = 1.0 - confidence
    return observed, _quantile(means, alpha / 2), _quantile(means, 1 - alpha / 2)


def minimum_detectable_difference(
    n: int, p: float, confidence: float = 0.95, power: float | None = None
) -> float:
    """The smallest difference between two proportions near `p`, each measured on `n` items,
    that a two-sided test at `confidence` detects: z * sqrt(2 p (1 - p) / n).

    That is the half-width of the interval of a difference of two independent proportions,
    about 2 * sqrt(2 p (1 - p) / n) at 95%; a paired design is usually a little tighter, so
    this is a conservative figure. With `power` (e.g. 0.8) the power quantile is added
    (z_alpha/2 + z_beta), the size detected with that probability.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be within [0, 1], got {p}")
    z = z_for(confidence)
    if power is not None:
        if not 0.0 < power < 1.0:
            raise ValueError(f"power must be within (0, 1), got {power}")
        z += NormalDist().inv_cdf(power)
    return z * math.sqrt(2.0 * p * (1.0 - p) / n)
