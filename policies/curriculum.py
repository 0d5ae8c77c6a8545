"""Which constraint kinds the next cycle's training prompts should carry.

A verified pair needs contrast: among one prompt's N samples, some satisfy its constraints and
some do not. A kind the model always passes, or never passes, yields no pairs, so prompts spent
on it are wasted. `learnability_weights` weights each kind by p(1 - p), the variance of a pass
(largest at p = 1/2, zero at 0 and 1), with p the kind's pass rate on earlier cycles' *training*
samples (never a held-out suite's results) under a uniform Beta(1, 1) prior, so an unseen kind
starts at p = 1/2 and full weight. A floor keeps every kind drawn now and then: a kind the model
cannot do yet may become learnable as it improves.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

# Relative to the best possible weight (1/4): a kind at the floor is drawn ~10x less often.
WEIGHT_FLOOR = 0.1


@dataclass(frozen=True)
class KindRecord:
    passes: int = 0
    total: int = 0

    @property
    def pass_rate(self) -> float:
        """Posterior mean under a Beta(1, 1) prior."""
        return (self.passes + 1) / (self.total + 2)


def tally(observations: Iterable[tuple[str, bool]]) -> dict[str, KindRecord]:
    """Per kind, how many (kind, satisfied) observations passed out of how many."""
    counts: dict[str, list[int]] = {}
    for kind, satisfied in observations:
        passes_total = counts.setdefault(kind, [0, 0])
        passes_total[0] += int(satisfied)
        passes_total[1] += 1
    return {kind: KindRecord(p, t) for kind, (p, t) in counts.items()}


def learnability_weights(
    kinds: Sequence[str], records: Mapping[str, KindRecord], floor: float = WEIGHT_FLOOR, repairable: Collection[str] = ()
) -> dict[str, float]:
    """Each kind's sampling weight, normalised to sum to 1: max(p(1-p) / (1/4), floor), and for a
    `repairable` kind max(p(1-p) / (1/4), 1 - p, floor)."""
    raw = {}
    for kind in kinds:
        p = records.get(kind, KindRecord()).pass_rate
        learnable = 4.0 * p * (1.0 - p)
        if kind in repairable:
            learnable = max(learnable, 1.0 - p)
        raw[kind] = max(learnable, floor)
    total = sum(raw.values())
    return {kind: weight / total for kind, weight in raw.items()}
