"""Judge-score histograms: whole-number buckets for the dashboard's charts, and bins fitted to a
range of expected (logprob) scores for `kaizen show`. Pure: counts in, labelled counts out."""

from __future__ import annotations

import math

SCORE_BUCKETS = (1, 2, 3, 4, 5)
UNPARSEABLE = "unparseable"


def nice_width(raw: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(power * step for step in (1, 2, 2.5, 5, 10) if power * step >= raw * (1 - 1e-9))


def fit_bins(counts: dict[float, int], target_bins: int = 12) -> dict[str, int]:
    """``{value: count}`` grouped into about ``target_bins`` equal bins with round edges over its range.

    Labels name the bins ("2.25-2.30" holds [2.25, 2.30), the last bin also its upper edge);
    whole-number data keeps whole-number bins ("3"). Empty bins inside the range are kept, so
    the shape stays visible.
    """
    if not counts:
        return {}
    low, high = min(counts), max(counts)
    if high == low:
        return {f"{low:g}": sum(counts.values())}
    whole = all(float(v).is_integer() for v in counts)
    width = nice_width((high - low) / target_bins)
    if whole:
        width = float(max(1, math.ceil(width)))
    start = math.floor(low / width + 1e-9) * width
    n_bins = int((high - start) / width + 1e-9) + 1
    edges = [start + i * width for i in range(n_bins + 1)]
    if whole and width == 1.0:
        labels = [f"{e:.0f}" for e in edges[:-1]]
    else:
        decimals = max(0, math.ceil(-math.log10(width) - 1e-9)) + (1 if f"{width:e}".startswith("2.5") else 0)
        labels = [f"{a:.{decimals}f}-{b:.{decimals}f}" for a, b in zip(edges, edges[1:])]
    histogram = dict.fromkeys(labels, 0)
    for value, n in counts.items():
        histogram[labels[min(int((value - start) / width + 1e-9), n_bins - 1)]] += n
    return histogram


def empty_histogram() -> dict[str, int]:
    return {str(b): 0 for b in SCORE_BUCKETS} | {UNPARSEABLE: 0}


def score_bucket(score: float | None) -> str:
    if score is None:
        return UNPARSEABLE
    return str(min(max(int(score), SCORE_BUCKETS[0]), SCORE_BUCKETS[-1]))
