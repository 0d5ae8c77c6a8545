"""The self-judge in logprob mode: the judge's reply is started with the rubric's cue and the
model's probabilities of the allowed continuations are read exactly (one forward pass).

* score: the expected value of P(1..5) after "Score:" (never unparseable);
* compare: P(A), P(B), P(tie) after "Winner:" in both orders, debiased by the swap average
  (``policies.debias``); the raw numbers of each order are kept for the position-bias metric;
* label: SteerLM attributes are rated in text, as in text mode (there is no single cue).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies import judge_metrics, rubric
from workers.judges.base import OVER_CONTEXT, Comparison, PromptLike, Score, prompt_text
from workers.judges.registry import register_judge
from workers.judges.self_text import ModelJudge, pairwise_contents, swap_comparison

# Room a logprob request leaves after its cue: the continuation tokens it scores.
CUE_ROOM = 8


@register_judge("self", mode=rubric.JUDGE_MODE_LOGPROB)
class SelfLogprobJudge(ModelJudge):
    @property
    def label_name(self) -> str:
        return f"{self.name}:{rubric.JUDGE_MODE_LOGPROB}"

    def _distributions(self, contents: list[str], cue: str, continuations: Sequence[str]):
        """The distribution per content; None where the request does not fit the context."""
        runtime = self.runtime()
        cues = [request + cue for request in self.requests(runtime, contents, CUE_ROOM)]
        fitting = [i for i, text in enumerate(cues) if runtime.fits(text, CUE_ROOM)]
        out: list[Any] = [None for _ in cues]
        if fitting:
            found = runtime.continuation_distribution([cues[i] for i in fitting], continuations, batch_size=self.context.settings.generation.batch_size)
            for index, distribution in zip(fitting, found, strict=True):
                out[index] = distribution
        return out

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        contents = [rubric.render_judge_prompt(prompt_text(p), answer) for p, answer in items]
        scores = []
        for d in self._distributions(contents, rubric.SCORE_CUE, rubric.SCORE_CONTINUATIONS):
            if d is None:
                scores.append(Score(value=None, raw="", parse_error=OVER_CONTEXT, judge=self.label_name))
                continue
            value = rubric.expected_score(d.probabilities)
            summary = f"{value:.3f} (score tokens held {d.mass:.1%} of the next-token probability)"
            raw = rubric.describe_distribution(rubric.SCORE_CONTINUATIONS, d.probabilities, summary)
            scores.append(Score(value=value, raw=raw, parse_error=None, judge=self.label_name, details={"probabilities": d.probabilities, "mass": d.mass}))
        return scores

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        distributions = self._distributions(pairwise_contents(items), rubric.VERDICT_CUE, rubric.VERDICT_CONTINUATIONS)
        comparisons = []
        for index in range(len(items)):
            first, second = distributions[2 * index], distributions[2 * index + 1]
            if first is None or second is None:
                comparisons.append(swap_comparison(self, None, None, {"error": OVER_CONTEXT}))
                continue
            raw: dict[str, Any] = {
                "first_p": [round(p, 4) for p in first.probabilities],
                "second_p": [round(p, 4) for p in second.probabilities],
                "order_verdicts": [rubric.verdict_from_distribution(first.probabilities), rubric.verdict_from_distribution(second.probabilities)],
                "verdict_mass": [round(first.mass, 4), round(second.mass, 4)],
            }
            comparisons.append(swap_comparison(self, first.probabilities, second.probabilities, raw))
        return comparisons

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        with_distribution = [s.details for s in scores if "probabilities" in s.details]
        return {
            "parse_failure_rate": 0.0 if scores else None,
            "self_agreement": judge_metrics.distribution_agreement(d["probabilities"] for d in with_distribution),
            "self_agreement_basis": "distribution",
            "score_token_mass": judge_metrics.mean_or_none(d["mass"] for d in with_distribution),
        }
