"""The promotion gate: does the candidate beat the champion clearly enough to replace it?

Two routes to a promotion:

- **pairwise**: each gate prompt is judged pairwise twice, with the answers in both positions,
  so that a judge that simply prefers whichever answer comes first (or second) produces ties,
  not wins; the Wilson lower bound of the win rate must clear the bar;
- **suite**: the candidate improves one of the configured evaluation suites (``improve_suites``)
  and the paired-bootstrap 95% lower bound of candidate minus champion is above
  ``suite_min_lower_bound`` (0: the improvement is not noise).

Either way no configured suite may fall by more than ``regression_tolerance``, the candidate
may not have got there by writing longer answers, and not too many comparisons may be
unreadable. The decision keeps every number it used.
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
    # Suites whose significant improvement promotes (the suite route); empty = pairwise only.
    improve_suites: tuple[str, ...] = ()
    suite_min_lower_bound: float = 0.0
    # How far any suite's score may fall (candidate minus champion, in score units) before it
    # counts as a regression that blocks promotion.
    regression_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.regression_tolerance < 0:
            raise ValueError("regression_tolerance must be >= 0")
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
class SuiteComparison:
    """Candidate and champion on the same suite items with the same decoding (paired).

    ``lower``/``upper``: the paired-bootstrap 95% interval of candidate minus champion;
    ``minimum_detectable``: the smallest difference this many items can detect (power)."""

    suite: str
    n: int
    candidate_score: float
    champion_score: float
    lower: float
    upper: float
    minimum_detectable: float | None = None

    @property
    def difference(self) -> float:
        return self.candidate_score - self.champion_score

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]
    win_rate: float
    win_rate_lower_bound: float
    length_ratio: float
    parse_failure_rate: float
    n: int
    route: str | None = None  # "pairwise" or "suite" when promoted
    suites: tuple[SuiteComparison, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: reasons as a list, a non-finite length ratio as None, suites as dicts."""
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        data["suites"] = [s.as_dict() for s in self.suites]
        if not math.isfinite(self.length_ratio):
            data["length_ratio"] = None
        return data


def decide(stats: GateStats, rule: GateRule, suites: Sequence[SuiteComparison] = ()) -> GateDecision:
    """Promote when one route (pairwise win, or significant improvement of an ``improve_suites``
    suite) carries and no check fails; the reasons name each failed check with its numbers, or
    say which route carried and why."""
    lower_bound = wilson_lower_bound(stats.successes, stats.n, rule.z)
    pairwise_problems = [r for r in (_too_few_comparisons(stats, rule), _win_not_clear(stats, rule, lower_bound)) if r]
    improved = [s for s in suites if s.suite in rule.improve_suites and s.lower > rule.suite_min_lower_bound]
    route = "pairwise" if not pairwise_problems else "suite" if improved else None
    checks = [
        reason
        for reason in (_length_blow_up(stats, rule), _too_many_parse_failures(stats, rule), *_regressions(suites, rule))
        if reason is not None
    ]
    if route is None:
        checks = [*pairwise_problems, *_suite_not_improved(suites, rule), *checks]
    reasons = checks or [_carried(route, stats, rule, lower_bound, improved)]
    return GateDecision(
        promote=not checks,
        reasons=tuple(reasons),
        win_rate=stats.win_rate,
        win_rate_lower_bound=lower_bound,
        length_ratio=stats.length_ratio,
        parse_failure_rate=stats.parse_failure_rate,
        n=stats.n,
        route=route if not checks else None,
        suites=tuple(suites),
    )


def _describe_suite(s: SuiteComparison) -> str:
    power = f", detectable >= {s.minimum_detectable:.3f}" if s.minimum_detectable is not None else ""
    return (
        f"{s.suite}: {s.candidate_score:.3f} vs {s.champion_score:.3f} over {s.n} items, difference "
        f"{s.difference:+.3f}, 95% CI [{s.lower:+.3f}, {s.upper:+.3f}]{power}"
    )


def _carried(route: str | None, stats: GateStats, rule: GateRule, lower_bound: float, improved: Sequence[SuiteComparison]) -> str:
    if route == "pairwise":
        return (
            f"clear win: win rate {stats.win_rate:.2f} over {stats.n} comparisons "
            f"({stats.wins} wins, {stats.losses} losses, {stats.ties} ties), Wilson lower bound "
            f"{lower_bound:.3f} > {rule.min_win_rate_lower_bound:.3f}"
        )
    return "suite improvement: " + "; ".join(_describe_suite(s) for s in improved) + (
        f" (lower bound > {rule.suite_min_lower_bound:g})"
    )


def _suite_not_improved(suites: Sequence[SuiteComparison], rule: GateRule) -> list[str]:
    if not rule.improve_suites:
        return []
    measured = [s for s in suites if s.suite in rule.improve_suites]
    if not measured:
        return [f"no suite improvement: none of {', '.join(rule.improve_suites)} was evaluated"]
    return [
        f"no significant suite improvement: {_describe_suite(s)}; lower bound does not exceed {rule.suite_min_lower_bound:g}"
        for s in measured
    ]


def _regressions(suites: Sequence[SuiteComparison], rule: GateRule) -> list[str]:
    return [
        f"regression on {_describe_suite(s)}; tolerance {rule.regression_tolerance:g}"
        for s in suites
        if s.difference < -rule.regression_tolerance
    ]


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
