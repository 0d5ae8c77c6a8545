"""The constraint checkers as a judge: code, not a model, says whether an answer complies.

A prompt carries its verifiable constraints (``policies.constraints`` JSON, see
:class:`~workers.judges.base.JudgePrompt`). ``score`` is the fraction of them the answer
satisfies; ``compare`` prefers the answer that satisfies more (1, 0, or 0.5 when both satisfy
as many). A prompt without constraints cannot be checked: the score is None and the comparison
undecided, so a composite judge hands it to its next backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from policies import constraints as checks
from workers.judges.base import Comparison, Judge, PromptLike, Score, prompt_constraints
from workers.judges.registry import register_judge

NO_CONSTRAINTS = "the prompt carries no constraints to check"


def satisfied(constraint_json: Sequence[Mapping[str, Any]], answer: str) -> list[bool]:
    return checks.check_all([checks.Constraint.from_json(c) for c in constraint_json], answer)


@register_judge("verifier")
class VerifierJudge(Judge):
    def _fraction(self, prompt: PromptLike, answer: str) -> tuple[float | None, list[dict[str, Any]]]:
        constraint_json = prompt_constraints(prompt)
        if not constraint_json:
            return None, []
        results = satisfied(constraint_json, answer)
        detail = [{"kind": c["kind"], "satisfied": ok} for c, ok in zip(constraint_json, results, strict=True)]
        return sum(results) / len(results), detail

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        scores = []
        for prompt, answer in items:
            value, detail = self._fraction(prompt, answer)
            raw = json.dumps(detail) if detail else NO_CONSTRAINTS
            scores.append(Score(value=value, raw=raw, parse_error=None if value is not None else NO_CONSTRAINTS, judge=self.label_name))
        return scores

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        comparisons = []
        for prompt, a, b in items:
            (fa, da), (fb, db) = self._fraction(prompt, a), self._fraction(prompt, b)
            if fa is None or fb is None:
                comparisons.append(Comparison(preference=None, raw={"reason": NO_CONSTRAINTS}, verdict=None, judge=self.label_name))
                continue
            preference = 1.0 if fa > fb else 0.0 if fa < fb else 0.5
            verdict = "a" if fa > fb else "b" if fa < fb else "tie"
            raw = {"satisfied_a": fa, "satisfied_b": fb, "checks_a": da, "checks_b": db}
            comparisons.append(Comparison(preference=preference, raw=raw, verdict=verdict, judge=self.label_name))
        return comparisons

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        checked = [s.value for s in scores if s.value is not None]
        return {
            # An unchecked prompt is not a parse failure; it is nothing to verify.
            "parse_failure_rate": 0.0 if scores else None,
            "checked_share": len(checked) / len(scores) if scores else None,
            "mean_satisfied": sum(checked) / len(checked) if checked else None,
        }
