"""Judges in sequence: the first decides where it can, the next orders what it could not.

``judge.backend: [verifier, self]`` checks constraints first; answers the checks cannot separate
(both comply equally, or the prompt has none) are ordered by the self-judge.

* ``compare``: each comparison goes down the list until a judge gives a verdict "a" or "b"; if
  none does, the last readable one (a tie) stands. ``raw`` keeps every level's numbers.
* ``score``: scores are made comparable *within one prompt* (the only place pairs are built and
  answers compared): per prompt, the levels every answer got a value from are combined
  lexicographically, value = v_1 * W_1 + (v_2 * W_2 + ...), each weight chosen so that the
  smallest difference of a level outweighs the whole spread of the levels after it. A
  difference between answers thus comes from the first level that separates them, in that
  level's units times its weight, or from the last level in its own units. Values of different
  prompts are not on one scale.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from workers.judges.base import Comparison, Judge, JudgeContext, PromptLike, Score, prompt_constraints, prompt_text

DECISIVE = ("a", "b")


class CompositeJudge(Judge):
    name = "composite"

    def __init__(self, context: JudgeContext, judges: Sequence[Judge]) -> None:
        super().__init__(context)
        if len(judges) < 2:
            raise ValueError("a composite judge needs at least two judges")
        self.judges = list(judges)

    @property
    def label_name(self) -> str:
        return "+".join(j.label_name for j in self.judges)

    # ------------------------------------------------------------------ compare

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        levels: list[list[Comparison]] = [[] for _ in items]
        pending = list(range(len(items)))
        for judge in self.judges:
            if not pending:
                break
            for index, comparison in zip(pending, judge.compare([items[i] for i in pending]), strict=True):
                levels[index].append(comparison)
            pending = [i for i in pending if levels[i][-1].verdict not in DECISIVE]
        return [self._decided(tried) for tried in levels]

    def _decided(self, tried: list[Comparison]) -> Comparison:
        decisive = [c for c in tried if c.verdict in DECISIVE]
        readable = [c for c in tried if c.preference is not None]
        final = decisive[0] if decisive else (readable[-1] if readable else None)
        raw = {
            "decided_by": final.judge if final is not None else None,
            "levels": [{"judge": c.judge, "preference": c.preference, "verdict": c.verdict, "raw": c.raw} for c in tried],
        }
        if final is None:
            return Comparison(preference=None, raw=raw, verdict=None, judge=self.label_name)
        return Comparison(preference=final.preference, raw=raw, verdict=final.verdict, judge=self.label_name)

    # ------------------------------------------------------------------ score

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        per_level = [judge.score(items) for judge in self.judges]
        by_prompt: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, (prompt, _) in enumerate(items):
            by_prompt[(prompt_text(prompt), json.dumps(prompt_constraints(prompt), sort_keys=True))].append(index)
        values: dict[int, float | None] = {}
        for indices in by_prompt.values():
            values.update(zip(indices, _lexicographic([[per_level[k][i].value for i in indices] for k in range(len(self.judges))]), strict=True))
        scores = []
        for index in range(len(items)):
            level_scores = [level[index] for level in per_level]
            raw = json.dumps([{"judge": s.judge, "value": s.value, "raw": s.raw[:300]} for s in level_scores])
            errors = [f"{s.judge}: {s.parse_error}" for s in level_scores if s.parse_error]
            value = values[index]
            scores.append(
                Score(
                    value=value, raw=raw, parse_error=None if value is not None else "; ".join(errors)[:256],
                    judge=self.label_name, details={"levels": level_scores},
                )
            )
        return scores

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for k, judge in enumerate(self.judges):
            level = [s.details["levels"][k] for s in scores if "levels" in s.details]
            for key, value in judge.score_metrics(level).items():
                metrics.setdefault(key, value)  # the first level's reading of a metric stands
        values = [s.value for s in scores]
        metrics["parse_failure_rate"] = sum(v is None for v in values) / len(values) if values else None
        return metrics


def _lexicographic(levels: list[list[float | None]]) -> list[float | None]:
    """One value per item, ordered by the first level, ties broken by the next, and so on.

    ``levels[k][i]`` is level k's value for item i; a level without a value for every item
    takes no part. None for every item when no level has all values.
    """
    usable = [level for level in levels if all(v is not None for v in level)]
    if not usable:
        return [None] * (len(levels[0]) if levels else 0)
    combined: list[float] = [float(v) for v in usable[-1]]  # type: ignore[arg-type]
    for level in reversed(usable[:-1]):
        gap = _smallest_gap(level)  # type: ignore[arg-type]
        if gap is None:
            continue  # this level does not separate any two items
        spread = max(combined) - min(combined)
        weight = (spread + 1.0) / gap
        combined = [v * weight + c for v, c in zip(level, combined, strict=True)]  # type: ignore[operator]
    return combined  # type: ignore[return-value]


def _smallest_gap(values: list[float]) -> float | None:
    distinct = sorted(set(values))
    gaps = [b - a for a, b in zip(distinct, distinct[1:], strict=False)]
    return min(gaps) if gaps else None
