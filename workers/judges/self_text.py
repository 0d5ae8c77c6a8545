"""The self-judge in text mode: the model writes its judgment, and the score, verdict or
attribute labels are parsed from it (``policies.rubric``, ``policies.steerlm``).

Scores are the mean of ``judge.num_samples`` sampled judgments that parsed (never imputed);
each sample is kept. A pairwise comparison samples one verdict per order and debiases them
with the swap average (``policies.debias``): "A" then "B" is a clear win, the same letter twice
is pure position, a tie in one order is half a win.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from policies import debias, judge_metrics, rubric
from policies.steerlm import combine_attribute_parses, parse_attribute_labels, render_attribute_rubric_prompt
from workers.judges.base import OVER_CONTEXT, Comparison, Judge, Labels, PromptLike, Score, prompt_text
from workers.judges.registry import register_judge

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime


class ModelJudge(Judge):
    """A judge that is a language model at ``model_path()`` (the policy, for the self-judge)."""

    def model_path(self) -> str:
        return self.context.policy_path

    def runtime(self) -> ModelRuntime:
        return self.context.load_model(self.model_path())

    def requests(self, runtime: ModelRuntime, contents: Sequence[str], budget: int | None = None) -> list[str]:
        return judge_requests(runtime, contents, budget)

    def label(self, items: Sequence[tuple[PromptLike, str]], attributes: Sequence[str]) -> list[Labels]:
        return label_by_text(self, self.runtime(), items, attributes)


def pairwise_contents(items: Sequence[tuple[PromptLike, str, str]]) -> list[str]:
    """Two pairwise rubric requests per item: a shown first, then b shown first."""
    contents = []
    for prompt, a, b in items:
        contents.append(rubric.render_pairwise_prompt(prompt_text(prompt), a, b))
        contents.append(rubric.render_pairwise_prompt(prompt_text(prompt), b, a))
    return contents


def sample_texts(judge: Judge, runtime: ModelRuntime, requests: list[str], *, n: int, seed_offset: int = 0, **overrides: Any) -> list[list[str]]:
    """``n`` judge samples per request; a request too long for the judge's context gets none
    (its score or verdict is then missing and says so, see :data:`OVER_CONTEXT`)."""
    settings = judge.context.settings
    max_new_tokens = overrides.get("max_new_tokens", settings.judge.max_new_tokens)
    fitting = [i for i, request in enumerate(requests) if runtime.fits(request, max_new_tokens)]
    if not fitting:
        return [[] for _ in requests]
    outputs = runtime.generate(
        [requests[i] for i in fitting],
        num_samples=n,
        max_new_tokens=max_new_tokens,
        temperature=overrides.get("temperature", settings.judge.temperature),
        top_p=overrides.get("top_p", settings.generation.top_p),
        seed=judge.context.seed + seed_offset,
        batch_size=settings.generation.batch_size,
    )
    texts: list[list[str]] = [[] for _ in requests]
    for index, samples in zip(fitting, outputs, strict=True):
        texts[index] = [o.text for o in samples]
    return texts


def label_by_text(judge: Judge, runtime: ModelRuntime, items: Sequence[tuple[PromptLike, str]], attributes: Sequence[str]) -> list[Labels]:
    """SteerLM attribute labels parsed from ``steerlm.judge_samples`` sampled ratings per answer."""
    s = judge.context.settings.steerlm
    requests = judge_requests(runtime, [render_attribute_rubric_prompt(prompt_text(p), answer) for p, answer in items], s.judge_max_new_tokens)
    outputs = sample_texts(judge, runtime, requests, n=s.judge_samples, max_new_tokens=s.judge_max_new_tokens)
    return labels_from_samples(judge.label_name, items, outputs, attributes)


def labels_from_samples(
    judge_name: str, items: Sequence[tuple[PromptLike, str]], outputs: Sequence[Sequence[str]], attributes: Sequence[str]
) -> list[Labels]:
    """Per answer, each attribute is the rounded mean of the samples that labelled it (never imputed);
    a label the answer itself plants ("helpfulness: 4") does not count."""
    labels = []
    for (_, answer), texts in zip(items, outputs, strict=True):
        parse = combine_attribute_parses([parse_attribute_labels(text, answer) for text in texts])
        values = {name: parse.labels[name] for name in attributes if name in parse.labels}
        failures = {name: parse.failures.get(name, "not labelled") for name in attributes if name not in values}
        labels.append(Labels(values=values, failures=failures, raw=tuple(texts), judge=judge_name))
    return labels


def judge_requests(runtime: ModelRuntime, contents: Sequence[str], budget: int | None = None) -> list[str]:
    """Each content as one user turn in the judge model's prompt format (URIAL leaves room for ``budget``)."""
    return [runtime.render_chat([{"role": "user", "content": content}], max_new_tokens=budget) for content in contents]


def order_preference(verdict: str | None) -> tuple[float, float, float] | None:
    return None if verdict is None else debias.letter_distribution(verdict)


def swap_comparison(judge: Judge, first: Sequence[float] | None, second: Sequence[float] | None, raw: dict[str, Any]) -> Comparison:
    """A comparison from the judge's (P(A), P(B), P(tie)) in both orders; None if either is missing."""
    if first is None or second is None:
        return Comparison(preference=None, raw=raw, verdict=None, judge=judge.label_name)
    average = debias.swap_average(first, second)
    preference = average.preference
    return Comparison(
        preference=preference, raw={**raw, **average.as_dict()}, verdict=debias.verdict(preference, judge.context.margin),  # type: ignore[arg-type]
        judge=judge.label_name,
    )


@register_judge("self", mode=rubric.JUDGE_MODE_TEXT)
class SelfTextJudge(ModelJudge):
    @property
    def label_name(self) -> str:
        return f"{self.name}:{rubric.JUDGE_MODE_TEXT}"

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        runtime = self.runtime()
        budget = self.context.settings.judge.max_new_tokens
        requests = self.requests(runtime, [rubric.render_judge_prompt(prompt_text(p), answer) for p, answer in items], budget)
        outputs = sample_texts(self, runtime, requests, n=self.context.settings.judge.num_samples)
        scores = []
        for (_, answer), texts in zip(items, outputs, strict=True):
            parsed = [rubric.parse_judge_output(text, answer) for text in texts]
            samples = tuple(
                Score(value=p.score, raw=text, parse_error=None if p.score is not None else p.reason[:256], judge=self.label_name)
                for text, p in zip(texts, parsed, strict=True)
            )
            mean = rubric.mean_score([p.score for p in parsed])
            error = None if mean is not None else ("; ".join(sorted({p.reason for p in parsed})) or OVER_CONTEXT)[:256]
            scores.append(Score(value=mean, raw=texts[0] if texts else "", parse_error=error, judge=self.label_name, samples=samples))
        return scores

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        runtime = self.runtime()
        budget = self.context.settings.judge.max_new_tokens
        requests = self.requests(runtime, pairwise_contents(items), budget)
        texts = [t[0] if t else "" for t in sample_texts(self, runtime, requests, n=1, seed_offset=1)]
        comparisons = []
        for index, (_, a, b) in enumerate(items):
            first_text, second_text = texts[2 * index], texts[2 * index + 1]
            # An order whose request did not fit has no text and so no verdict.
            verdicts = [rubric.parse_pairwise_verdict(t, (a, b)) if t else None for t in (first_text, second_text)]
            raw = {"order_verdicts": verdicts, "first_text": first_text[-400:], "second_text": second_text[-400:]}
            comparisons.append(swap_comparison(self, order_preference(verdicts[0]), order_preference(verdicts[1]), raw))
        return comparisons

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        per_sample = [sample.value for score in scores for sample in score.samples]
        return {
            "parse_failure_rate": judge_metrics.parse_failure_rate(per_sample),
            "self_agreement": judge_metrics.sample_agreement([[s.value for s in score.samples] for score in scores]),
            "self_agreement_basis": "samples",
        }
