"""Evaluation suites, the pure part: which suites exist, their items, how an answer scores.

A suite is a set of items plus a scorer. Generation (greedy answers from a checkpoint) and
recording live in `workers.evaluation`; this module never touches a model or a database.

- `instruct-checks`: the packaged held-out items (policies/data/instruct_checks.jsonl, made by
  ops/make_instruct_checks.py). An item scores 1 when its answer satisfies ALL its
  constraints, else 0; the suite score is the mean, and per-kind satisfaction rates are kept.
- `gate-checks`: the gate's own held-out items (policies/data/gate_checks.jsonl), made and scored
  like instruct-checks from 60 other stems. The gate selects candidates on it, so the reported
  instruct-checks score stays a measurement on items no decision has looked at.
- `jsonl`: a user's file, one JSON object per line: `{"prompt": ..., "constraints": [...]}`
  scored like instruct-checks, or `{"prompt": ..., "reference": ...}` scored 1 when the
  normalised reference (lower case, punctuation dropped, whitespace collapsed) occurs as a
  whole-word run in the normalised answer, which includes the exact match. "id" is optional.
- `pairwise-vs-initial`: the checkpoint's answers against the lineage's initial model's,
  judged in both orders; the score is the mean debiased preference (1 = always better).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from policies.constraints import Constraint, check_all
from policies.repetition import loops
from policies.self_instruct import normalize_prompt
from policies.stats import minimum_detectable_difference, paired_bootstrap, proportion_ci

SUITE_INSTRUCT_CHECKS = "instruct-checks"
SUITE_GATE_CHECKS = "gate-checks"
SUITE_JSONL = "jsonl"
SUITE_PAIRWISE_VS_INITIAL = "pairwise-vs-initial"
INSTRUCT_CHECKS_RESOURCE = "data/instruct_checks.jsonl"
# Suites whose items ship with kaizen: name -> resource under policies/.
PACKAGED_SUITES = {SUITE_INSTRUCT_CHECKS: INSTRUCT_CHECKS_RESOURCE, SUITE_GATE_CHECKS: "data/gate_checks.jsonl"}
# Answers a checks suite can score 0 whatever their checks say (eval.count_as_failing).
COUNTABLE_AS_FAILING = ("cut", "loops")


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    # "checks": each item's answer is scored on its own; "pairwise": against the initial model.
    kind: str
    description: str


SUITES: dict[str, SuiteSpec] = {
    spec.name: spec
    for spec in (
        SuiteSpec(SUITE_INSTRUCT_CHECKS, "checks", "held-out prompts with verifiable constraints, all must hold"),
        SuiteSpec(SUITE_GATE_CHECKS, "checks", "the gate's own held-out constraint prompts (other stems)"),
        SuiteSpec(SUITE_JSONL, "checks", "a user file of prompts with constraints or a reference answer"),
        SuiteSpec(SUITE_PAIRWISE_VS_INITIAL, "pairwise", "judged win rate against the lineage's initial model"),
    )
}


def suite_spec(name: str) -> SuiteSpec:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; allowed: {', '.join(sorted(SUITES))}") from None


@dataclass(frozen=True)
class SuiteItem:
    id: str
    prompt: str
    constraints: tuple[Constraint, ...] = ()
    reference: str | None = None
    # The bare task when the prompt is a task plus rendered constraint sentences.
    task: str | None = None


@dataclass(frozen=True)
class ItemResult:
    id: str
    answer: str
    passed: tuple[bool, ...]
    score: float
    kinds: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "answer": self.answer, "passed": list(self.passed), "score": self.score,
                "kinds": list(self.kinds)}


@dataclass(frozen=True)
class SuiteSummary:
    score: float
    n: int
    ci_low: float
    ci_high: float
    per_kind: dict[str, float] = field(default_factory=dict)


# --- Items ----------------------------------------------------------------------------


def packaged_text(suite: str) -> str:
    """The JSON lines of a suite that ships with kaizen (a key of PACKAGED_SUITES)."""
    return resources.files("policies").joinpath(PACKAGED_SUITES[suite]).read_text(encoding="utf-8")


def load_packaged(suite: str) -> list[SuiteItem]:
    return parse_items(packaged_text(suite), PACKAGED_SUITES[suite])


def instruct_checks_text() -> str:
    return packaged_text(SUITE_INSTRUCT_CHECKS)


def load_instruct_checks() -> list[SuiteItem]:
    return load_packaged(SUITE_INSTRUCT_CHECKS)


def heldout_suite_tasks() -> list[str]:
    """The task stems of every packaged suite's items (what training must never see)."""
    return sorted({item.task or item.prompt for suite in PACKAGED_SUITES for item in load_packaged(suite)})


def parse_items(text: str, source: str) -> list[SuiteItem]:
    """Items from JSON lines; a bad line raises ValueError naming `source`, the line and the fix."""
    items: list[SuiteItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_parse_item(json.loads(line), default_id=str(number)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
    if not items:
        raise ValueError(f"{source}: no items; write one JSON object per line with a \"prompt\"")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: item ids must be unique")
    return items


def _parse_item(data: Any, default_id: str) -> SuiteItem:
    if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise ValueError("each line must be a JSON object with a non-empty string \"prompt\"")
    has_constraints, has_reference = "constraints" in data, "reference" in data
    if has_constraints == has_reference:
        raise ValueError("give exactly one of \"constraints\" (a list of {\"kind\": ...}) or \"reference\" (a string)")
    item_id = str(data.get("id", default_id))
    if has_reference:
        if not isinstance(data["reference"], str) or not normalize_prompt(data["reference"]):
            raise ValueError("\"reference\" must be a string with at least one word")
        return SuiteItem(item_id, data["prompt"], reference=data["reference"])
    raw = data["constraints"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("\"constraints\" must be a non-empty list of {\"kind\": ...} objects")
    task = data.get("task") if isinstance(data.get("task"), str) else None
    return SuiteItem(item_id, data["prompt"], constraints=tuple(Constraint.from_json(c) for c in raw), task=task)


# --- Scoring --------------------------------------------------------------------------


def reference_matches(reference: str, answer: str) -> bool:
    """The normalised reference occurs as a whole-word run in the normalised answer."""
    target = normalize_prompt(reference)
    return bool(target) and f" {target} " in f" {normalize_prompt(answer)} "


def score_item(item: SuiteItem, answer: str) -> ItemResult:
    if item.reference is not None:
        passed: tuple[bool, ...] = (reference_matches(item.reference, answer),)
    else:
        passed = tuple(check_all(item.constraints, answer))
    return ItemResult(item.id, answer, passed, 1.0 if all(passed) else 0.0,
                      tuple(c.kind for c in item.constraints))


def summarize(results: Sequence[ItemResult], confidence: float = 0.95) -> SuiteSummary:
    """Mean item score with its Wilson interval, and each constraint kind's satisfaction rate."""
    n = len(results)
    total = sum(result.score for result in results)
    low, high = proportion_ci(total, n, confidence)
    return SuiteSummary(total / n if n else 0.0, n, low, high, per_kind_rates(results))


def per_kind_rates(results: Iterable[ItemResult]) -> dict[str, float]:
    passes: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        for kind, ok in zip(result.kinds, result.passed, strict=False):
            passes[kind].append(ok)
    return {kind: sum(flags) / len(flags) for kind, flags in sorted(passes.items())}


def config_hash(suite: str, decoding: Mapping[str, Any], content: str) -> str:
    """What decides a suite's results: its name, the decoding settings and its items' text."""
    payload = json.dumps(
        {"suite": suite, "decoding": dict(decoding), "content_sha256": hashlib.sha256(content.encode()).hexdigest()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PairedDifference:
    """Checkpoint A against checkpoint B on the items both answered: scores, A - B with its
    paired-bootstrap interval, and the smallest difference n items can detect."""

    n: int
    a_score: float
    b_score: float
    difference: float
    low: float
    high: float
    minimum_detectable: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def counted_as_failing(item: Mapping[str, Any], failing: Collection[str]) -> bool:
    """Whether a recorded item's answer is one `failing` names: "cut" (``finished`` False: it hit
    the token budget) or "loops" (it repeats a line or phrase: its recorded ``loops`` flag, else
    :func:`policies.repetition.loops` of its answer, for rows recorded before the flag)."""
    unknown = set(failing) - set(COUNTABLE_AS_FAILING)
    if unknown:
        raise ValueError(f"cannot count {sorted(unknown)} as failing; allowed: {', '.join(COUNTABLE_AS_FAILING)}")
    if "cut" in failing and item.get("finished") is False:
        return True
    return "loops" in failing and bool(item["loops"] if "loops" in item else loops(str(item.get("answer") or "")))


def scored_failing(items: Sequence[Mapping[str, Any]], failing: Collection[str]) -> list[dict[str, Any]]:
    """The items with every answer :func:`counted_as_failing` scored 0 (unscored items stay unscored).

    A cut answer can pass its checks by looping on a format: "[name]" lines for placeholders,
    "Section X" for numbered sections. Scored this way, only answers that ended, or that do not
    loop, count (eval.count_as_failing scores suites so; the improvement bench prints both)."""
    return [{**item, "score": 0.0} if item.get("score") is not None and counted_as_failing(item, failing) else dict(item)
            for item in items]


def paired_difference(
    a_items: Sequence[Mapping[str, Any]],
    b_items: Sequence[Mapping[str, Any]],
    n_resamples: int,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Pairs the two results' per-item scores by item id (items scored None, e.g. an
    unreadable pairwise verdict, and items only one side has are left out)."""
    b_by_id = {item["id"]: item.get("score") for item in b_items}
    pairs = [(item["score"], b_by_id[item["id"]]) for item in a_items
             if item.get("score") is not None and b_by_id.get(item["id"]) is not None]
    if not pairs:
        raise ValueError("the two results share no scored items; were they evaluated on the same suite?")
    a_scores, b_scores = [a for a, _ in pairs], [b for _, b in pairs]
    difference, low, high = paired_bootstrap(a_scores, b_scores, n_resamples, seed, confidence)
    pooled = (sum(a_scores) + sum(b_scores)) / (2 * len(pairs))
    return PairedDifference(
        n=len(pairs), a_score=sum(a_scores) / len(pairs), b_score=sum(b_scores) / len(pairs),
        difference=difference, low=low, high=high,
        minimum_detectable=minimum_detectable_difference(len(pairs), pooled, confidence), confidence=confidence,
    )
