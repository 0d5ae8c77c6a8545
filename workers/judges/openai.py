"""A judge behind any OpenAI-compatible chat endpoint (vLLM, llama.cpp, another `kaizen serve`).

The same rubric prompts as the self-judge go to ``judge.openai.base_url``. When the server
returns ``top_logprobs``, the judge's probabilities of the scores (after "Score:") or verdicts
(after "Winner:") are read from the token that follows the cue, as in logprob mode; otherwise
the score or verdict is parsed from the text (``policies.rubric``). Pairwise comparisons ask
in both orders and are debiased by the swap average.

Failures: a request that cannot connect, times out or gets 408/409/429/5xx is retried
``max_retries`` times with exponential backoff; then :class:`JudgeUnavailable` says which
endpoint failed and how to fix it. The stage fails before writing anything, so a re-run after
the endpoint is back loses nothing. The API key is read from the environment variable named
by ``api_key_env`` at request time and appears in no message; credentials written into
``base_url`` (``user:password@``) are masked in every message and log line.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from daemon.config import redact_url
from policies import rubric
from policies.steerlm import render_attribute_rubric_prompt
from workers.judges.base import Comparison, Judge, JudgeUnavailable, Labels, PromptLike, Score, prompt_text
from workers.judges.registry import register_judge
from workers.judges.self_text import labels_from_samples, order_preference, pairwise_contents, swap_comparison

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
TOP_LOGPROBS = 20
SCORE_LABELS = tuple(c.strip() for c in rubric.SCORE_CONTINUATIONS)
VERDICT_LABELS = tuple(c.strip() for c in rubric.VERDICT_CONTINUATIONS)


@dataclass(frozen=True)
class Reply:
    text: str
    # The token alternatives of each generated token, when the server sent them.
    logprobs: list[dict[str, Any]] | None


class _Retryable(Exception):
    pass


class Endpoint:
    """Chat completions against one OpenAI-compatible server, with retries and bounded concurrency."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        # What messages and logs name: a stage's error is stored in the lineage, so no password.
        self.shown_url = redact_url(self.url)

    def _headers(self) -> dict[str, str]:
        name = self.cfg.api_key_env
        if not name:
            return {}
        key = os.environ.get(name)
        if not key:
            raise JudgeUnavailable(f"judge.openai.api_key_env names {name}, which is not set in this worker's environment; export it")
        return {"Authorization": f"Bearer {key}"}

    def chat(self, client: httpx.Client, content: str, *, max_tokens: int, temperature: float, seed: int) -> Reply:
        payload: dict[str, Any] = {
            "model": self.cfg.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
        }
        if self.cfg.logprobs:
            payload |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        headers = self._headers()
        attempts = self.cfg.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            try:
                response = client.post(self.url, json=payload, headers=headers, timeout=self.cfg.timeout_seconds)
                if response.status_code in RETRYABLE_STATUS:
                    raise _Retryable(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise JudgeUnavailable(
                        f"judge endpoint {self.shown_url} refused the request: HTTP {response.status_code} {response.text[:200]}; "
                        "check judge.openai.model and the key in judge.openai.api_key_env"
                    )
                return _reply(response.json())
            except (httpx.TransportError, _Retryable) as exc:
                problem = f"{type(exc).__name__}: {exc}".replace(self.url, self.shown_url)
                if attempt + 1 < attempts:
                    delay = self.cfg.backoff_seconds * 2**attempt
                    log.warning("judge.openai_retry", url=self.shown_url, attempt=attempt + 1, problem=problem, retry_in=delay)
                    time.sleep(delay)
        raise JudgeUnavailable(
            f"judge endpoint {self.shown_url} unreachable after {attempts} attempts ({problem}); "
            "start the server or fix judge.openai.base_url, then run the stage again"
        )

    def chat_many(self, contents: Sequence[str], *, max_tokens: int, temperature: float, seed: int) -> list[Reply]:
        if not contents:
            return []
        with httpx.Client() as client, ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = [
                pool.submit(self.chat, client, content, max_tokens=max_tokens, temperature=temperature, seed=seed + i)
                for i, content in enumerate(contents)
            ]
            return [future.result() for future in futures]


def _reply(body: Mapping[str, Any]) -> Reply:
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise JudgeUnavailable(f"judge endpoint answered without a chat completion: {str(body)[:200]}") from None
    content = (choice.get("logprobs") or {}).get("content")
    return Reply(text=text, logprobs=content if isinstance(content, list) and content else None)


def distribution_after_cue(tokens: Sequence[Mapping[str, Any]], cue: str, labels: Sequence[str]) -> list[float] | None:
    """P(label) over ``labels`` at the first token after the last ``cue`` in the generated tokens,
    read from that token's top_logprobs (renormalised over the labels); None when the reply has
    no such cue or none of the labels is among the alternatives."""
    written = ""
    position = None
    for index, token in enumerate(tokens):
        if written.rstrip().lower().endswith(cue.lower()) and str(token.get("token", "")).strip():
            position = index
        written += str(token.get("token", ""))
    if position is None:
        return None
    mass = dict.fromkeys(labels, 0.0)
    for alternative in tokens[position].get("top_logprobs") or []:
        label = str(alternative.get("token", "")).strip()
        if label in mass:
            mass[label] += math.exp(float(alternative["logprob"]))
    total = sum(mass.values())
    return [mass[label] / total for label in labels] if total > 0 else None


@register_judge("openai")
class OpenAIJudge(Judge):
    @property
    def label_name(self) -> str:
        return f"openai:{self.context.settings.judge.openai.model}"[:64]

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.context.settings.judge.openai)

    def _ask(self, contents: Sequence[str], *, seed_offset: int = 0, **overrides: Any) -> list[Reply]:
        j = self.context.settings.judge
        return self.endpoint.chat_many(
            contents, max_tokens=overrides.get("max_tokens", j.max_new_tokens),
            temperature=overrides.get("temperature", j.temperature), seed=self.context.seed + seed_offset,
        )

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        replies = self._ask([rubric.render_judge_prompt(prompt_text(p), answer) for p, answer in items])
        scores = []
        for (_, answer), reply in zip(items, replies, strict=True):
            distribution = distribution_after_cue(reply.logprobs or [], rubric.SCORE_CUE, SCORE_LABELS)
            if distribution is not None:
                value = rubric.expected_score(distribution)
                scores.append(Score(value=value, raw=reply.text, parse_error=None, judge=self.label_name, details={"probabilities": distribution}))
                continue
            parsed = rubric.parse_judge_output(reply.text, answer)
            error = None if parsed.score is not None else parsed.reason[:256]
            scores.append(Score(value=parsed.score, raw=reply.text, parse_error=error, judge=self.label_name))
        return scores

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        replies = self._ask(pairwise_contents(items), seed_offset=1)
        comparisons = []
        for index, (_, a, b) in enumerate(items):
            orders = [self._order(replies[2 * index + k], (a, b)) for k in (0, 1)]
            raw = {"order_verdicts": [o[1] for o in orders], "first_text": replies[2 * index].text[-400:], "second_text": replies[2 * index + 1].text[-400:]}
            comparisons.append(swap_comparison(self, orders[0][0], orders[1][0], raw))
        return comparisons

    def _order(self, reply: Reply, answers: tuple[str, str]) -> tuple[Sequence[float] | None, str | None]:
        """(P(A), P(B), P(tie)) of one order and its verdict letter; from logprobs if sent, else the text."""
        distribution = distribution_after_cue(reply.logprobs or [], rubric.VERDICT_CUE, VERDICT_LABELS)
        if distribution is not None:
            return distribution, rubric.verdict_from_distribution(distribution)
        letter = rubric.parse_pairwise_verdict(reply.text, answers)
        return order_preference(letter), letter

    def label(self, items: Sequence[tuple[PromptLike, str]], attributes: Sequence[str]) -> list[Labels]:
        s = self.context.settings.steerlm
        contents = [render_attribute_rubric_prompt(prompt_text(p), answer) for p, answer in items]
        per_sample = [self._ask(contents, seed_offset=2 + k, max_tokens=s.judge_max_new_tokens) for k in range(s.judge_samples)]
        outputs = [[replies[index].text for replies in per_sample] for index in range(len(items))]
        return labels_from_samples(self.label_name, items, outputs, attributes)
