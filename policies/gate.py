"""The promotion gate: does the candidate beat the champion clearly enough to replace it?

Each gate prompt is judged pairwise twice, with the answers in both positions, so that
a judge that simply prefers whichever answer comes first (or second) produces ties, not
wins. The candidate is promoted only when the Wilson lower bound of its win rate clears
the bar, and not when it got there by writing longer answers or when too many
comparisons could not be read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

OUTCOME_CANDIDATE = "candidate"
OUTCOME_CHAMPION = "champion"
OUTCOME_TIE = "tie"
_OUTCOMES = (OUTCOME_CANDIDATE, OUTCOME_CHAMPION, OUTCOME_TIE)

# The verdict letters as seen from the candidate in each order.
# Order 1 shows the candidate as A and the champion as B; order 2 swaps them.
_CANDIDATE_FIRST = {"A": OUTCOME_CANDIDATE, "B": OUTCOME_CHAMPION, "tie": OUTCOME_TIE}
_CHAMPION_FIRST = {"A": OUTCOME_CHAMPION, "B": OUTCOME_CANDIDATE, "tie": OUTCOME_TIE}


def wilson_lower_bound(successes: float, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval for a success rate of successes/n.

    `successes` may be fractional (a tie counts half). 0.0 when n == 0: no evidence
    supports any win rate above zero.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def combine_two_orders(
    verdict_candidate_first: str | None,
    verdict_champion_first: str | None,
) -> str | None:
    """One outcome from the two orders of the same comparison.

    `verdict_candidate_first` is the judge's "A"/"B"/"tie" when the candidate was shown
    as A (champion as B); `verdict_champion_first` when the champion was shown as A
    (candidate as B). So "A" then "B" means the candidate won both times.

    Returns "candidate" or "champion" when both orders agree, "tie" when both say tie or
    they disagree in any way (a verdict that follows the position rather than the answer
    is position bias, not evidence), and None when either order did not parse.
    """
    if verdict_candidate_first is None or verdict_champion_first is None:
        return None
    first = _outcome(verdict_candidate_first, _CANDIDATE_FIRST)
    second = _outcome(verdict_champion_first, _CHAMPION_FIRST)
    return first if first == second else OUTCOME_TIE


def _outcome(verdict: str, meaning: dict[str, str]) -> str:
    if verdict not in meaning:
        raise ValueError(f"unknown verdict {verdict!r}; expected one of {sorted(meaning)} or None")
    return meaning[verdict]


@dataclass(frozen=True)
class GateRule:
    min_win_rate_lower_bound: float = 0.5
    z: float = 1.96
    min_comparisons: int = 4
    max_length_ratio: float = 1.5
    max_parse_failure_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_win_rate_lower_bound < 1.0:
            raise ValueError("min_win_rate_lower_bound must be within [0, 1)")
        if self.z <= 0:
            raise ValueError("z must be > 0")
        if self.min_comparisons < 1:
            raise ValueError("min_comparisons must be >= 1")
        if self.max_length_ratio <= 0:
            raise ValueError("max_length_ratio must be > 0")
        if not 0.0 <= self.max_parse_failure_rate <= 1.0:
            raise ValueError("max_parse_failure_rate must be within [0, 1]")


@dataclass(frozen=True)
class GateStats:
    wins: int
    losses: int
    ties: int
    unparseable: int
    candidate_mean_length: float
    champion_mean_length: float

    @property
    def n(self) -> int:
        """Comparisons with a usable outcome (wins, losses and ties)."""
        return self.wins + self.losses + self.ties

    @property
    def successes(self) -> float:
        return self.wins + 0.5 * self.ties

    @property
    def win_rate(self) -> float:
        """(wins + ties/2) / n; 0.0 with no usable comparison."""
        return self.successes / self.n if self.n else 0.0

    @property
    def length_ratio(self) -> float:
        """Candidate mean answer length over the champion's; inf if only the champion's is 0."""
        if self.champion_mean_length > 0:
            return self.candidate_mean_length / self.champion_mean_length
        return 1.0 if self.candidate_mean_length == 0 else math.inf

    @property
    def parse_failure_rate(self) -> float:
        """unparseable / all comparisons; 0.0 when there were none."""
        total = self.n + self.unparseable
        return self.unparseable / total if total else 0.0


def tally(
    combined: Sequence[str | None],
    candidate_lengths: Sequence[float],
    champion_lengths: Sequence[float],
) -> GateStats:
    """Count outcomes from `combine_two_orders` (None = unparseable) and average the
    answer lengths (any unit, the same for both; an empty list averages to 0)."""
    unknown = [outcome for outcome in combined if outcome is not None and outcome not in _OUTCOMES]
    if unknown:
        raise ValueError(f"unknown outcomes {unknown!r}; expected one of {_OUTCOMES} or None")
    return GateStats(
        wins=combined.count(OUTCOME_CANDIDATE),
        losses=combined.count(OUTCOME_CHAMPION),
        ties=combined.count(OUTCOME_TIE),
        unparseable=combined.count(None),
        candidate_mean_length=_mean(candidate_lengths),
        champion_mean_length=_mean(champion_lengths),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]
    win_rate: float
    win_rate_lower_bound: float
    length_ratio: float
    parse_failure_rate: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: reasons as a list, a non-finite length ratio as None."""
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        if not math.isfinite(self.length_ratio):
            data["length_ratio"] = None
        return data


def decide(stats: GateStats, rule: GateRule) -> GateDecision:
    """Promote only if every check passes; the reasons name each failed check with its
    numbers, or say why the win is clear."""
    lower_bound = wilson_lower_bound(stats.successes, stats.n, rule.z)
    failures = [
        reason
        for reason in (
            _too_few_comparisons(stats, rule),
            _win_not_clear(stats, rule, lower_bound),
            _length_blow_up(stats, rule),
            _too_many_parse_failures(stats, rule),
        )
        if reason is not None
    ]
    reasons = failures or [
        f"clear win: win rate {stats.win_rate:.2f} over {stats.n} comparisons "
        f"({stats.wins} wins, {stats.losses} losses, {stats.ties} ties), Wilson lower bound "
        f"{lower_bound:.3f} > {rule.min_win_rate_lower_bound:.3f}"
    ]
    return GateDecision(
        promote=not failures,
        reasons=tuple(reasons),
        win_rate=stats.win_rate,
        win_rate_lower_bound=lower_bound,
        length_ratio=stats.length_ratio,
        parse_failure_rate=stats.parse_failure_rate,
        n=stats.n,
    )


def _too_few_comparisons(stats: GateStats, rule: GateRule) -> str | None:
    if stats.n >= rule.min_comparisons:
        return None
    return f"too few comparisons: {stats.n} usable, need at least {rule.min_comparisons}"


def _win_not_clear(stats: GateStats, rule: GateRule, lower_bound: float) -> str | None:
    # Strictly greater: a bound sitting exactly on the bar is not evidence of a win.
    if lower_bound > rule.min_win_rate_lower_bound:
        return None
    return (
        f"no clear win: win rate {stats.win_rate:.2f} ({stats.wins} wins, {stats.losses} "
        f"losses, {stats.ties} ties), Wilson lower bound {lower_bound:.3f} at z={rule.z:g} "
        f"does not exceed {rule.min_win_rate_lower_bound:.3f}"
    )


def _length_blow_up(stats: GateStats, rule: GateRule) -> str | None:
    # Judges favour longer answers; a win bought with length is not an improvement.
    if stats.length_ratio <= rule.max_length_ratio:
        return None
    return (
        f"length blow-up: candidate answers are {stats.length_ratio:.2f}x the champion's "
        f"length (mean {stats.candidate_mean_length:.1f} vs {stats.champion_mean_length:.1f}), "
        f"max {rule.max_length_ratio:.2f}x"
    )


def _too_many_parse_failures(stats: GateStats, rule: GateRule) -> str | None:
    # When most verdicts are unreadable, the readable ones are not a fair sample.
    if stats.parse_failure_rate <= rule.max_parse_failure_rate:
        return None
    return (
        f"too many unparseable comparisons: {stats.unparseable} of "
        f"{stats.n + stats.unparseable} ({stats.parse_failure_rate:.0%}), "
        f"max {rule.max_parse_failure_rate:.0%}"
    )
