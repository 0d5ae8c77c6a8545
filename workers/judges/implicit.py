"""CREAM-style judging by the DPO implicit reward: no judge prompt, nothing to parse.

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

summed over the answer's tokens, with pi the current policy and pi_ref the reference named by
``judge.implicit.reference``: ``initial`` (the lineage's first model) or ``parent`` (the model
the policy was trained from, i.e. the champion with its last adapter disabled). ``score`` is
r; ``compare`` is sigmoid(r(a) - r(b)), the Bradley-Terry preference DPO itself optimises.

While the policy is its own reference (the first cycle of a lineage) every reward is 0 and
every comparison a tie: the judge has learnt nothing yet. Compose it after a judge that can
separate answers from the start (``judge.backend: [verifier, implicit]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies import debias
from workers.judges.base import OVER_CONTEXT, Comparison, Judge, JudgeUnavailable, PromptLike, Score, prompt_text
from workers.judges.registry import register_judge

REFERENCE_INITIAL = "initial"
REFERENCE_PARENT = "parent"


@register_judge("implicit")
class ImplicitRewardJudge(Judge):
    @property
    def beta(self) -> float:
        return self.context.settings.judge.implicit.beta

    def reference_path(self) -> str | None:
        """The reference model's path; None when the policy is its own reference."""
        which = self.context.settings.judge.implicit.reference
        path = self.context.initial_path if which == REFERENCE_INITIAL else self.context.parent_path
        if path is None and which == REFERENCE_INITIAL:
            raise JudgeUnavailable("judge.implicit.reference is 'initial' but the lineage's initial checkpoint is unknown here")
        return None if path is None or path == self.context.policy_path else path

    def _logprobs(self, path: str, items: Sequence[tuple[PromptLike, str]]) -> list[float | None]:
        """log p(answer | prompt) per item; None where prompt + answer do not fit the model's context."""
        runtime = self.context.load_model(path)
        prompts = [runtime.render_chat([{"role": "user", "content": prompt_text(p)}]) for p, _ in items]
        answers = [answer for _, answer in items]
        fitting = [i for i, (p, a) in enumerate(zip(prompts, answers, strict=True)) if runtime.fits(p, len(runtime.encode_completion(a)))]
        batch = self.context.settings.generation.batch_size
        found = runtime.sequence_logprobs([prompts[i] for i in fitting], [answers[i] for i in fitting], batch_size=batch) if fitting else []
        out: list[float | None] = [None for _ in items]
        for index, value in zip(fitting, found, strict=True):
            out[index] = value
        return out

    def rewards(self, items: Sequence[tuple[PromptLike, str]]) -> list[tuple[float, float, float] | None]:
        """(reward, log pi, log pi_ref) per item; None for an item over the context length."""
        if not items:
            return []
        policy = self._logprobs(self.context.policy_path, items)
        reference_path = self.reference_path()
        reference = policy if reference_path is None else self._logprobs(reference_path, items)
        return [
            None if lp is None or lr is None else (self.beta * (lp - lr), lp, lr)
            for lp, lr in zip(policy, reference, strict=True)
        ]

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        return [
            Score(value=None, raw="", parse_error=OVER_CONTEXT, judge=self.label_name) if r is None else Score(
                value=r[0], parse_error=None, judge=self.label_name,
                raw=f"implicit reward {self.beta:g} * ({r[1]:.4f} - {r[2]:.4f}) = {r[0]:.4f}",
                details={"policy_logprob": r[1], "reference_logprob": r[2]},
            )
            for r in self.rewards(items)
        ]

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        flat = [(p, a) for p, a, _ in items] + [(p, b) for p, _, b in items]
        rewards = self.rewards(flat)
        comparisons = []
        for index in range(len(items)):
            pair = rewards[index], rewards[len(items) + index]
            if pair[0] is None or pair[1] is None:
                comparisons.append(Comparison(preference=None, raw={"error": OVER_CONTEXT}, verdict=None, judge=self.label_name))
                continue
            reward_a, reward_b = pair[0][0], pair[1][0]
            preference = debias.sigmoid(reward_a - reward_b)
            raw: dict[str, Any] = {"reward_a": round(reward_a, 6), "reward_b": round(reward_b, 6)}
            comparisons.append(
                Comparison(preference=preference, raw=raw, verdict=debias.verdict(preference, self.context.margin), judge=self.label_name)  # type: ignore[arg-type]
            )
        return comparisons

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        return {"parse_failure_rate": 0.0 if scores else None}
