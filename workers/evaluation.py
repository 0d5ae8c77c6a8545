"""Evaluation suites, the model side: answer a suite's prompts with a checkpoint (greedy,
fixed max tokens), score the answers (policies/suites.py) and record a `suite_results` row.

A row is keyed by (checkpoint, suite, config hash); the hash covers what changes results:
the suite's name and item text, the decoding settings (greedy, eval.max_new_tokens,
eval.max_items), eval.count_as_failing for checks suites and, for pairwise-vs-initial, the judge configuration, the prompt count and
the initial checkpoint. A cached row is returned as it is unless `force`. eval.batch_size is
not in the hash: batching pads on the left under an attention mask, which leaves greedy
answers unchanged up to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from daemon.db import lineage, suite_results
from daemon.db.engine import transaction
from daemon.db.models import Checkpoint, SuiteResult
from policies import suites
from policies.repetition import loops
from policies.stats import proportion_ci
from workers import artifacts
from workers.judges import build_judge
from workers.generation import Generation
from workers.loading import load_runtime, user_prompt

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PreparedSuite:
    name: str
    items: list[suites.SuiteItem]
    config: dict[str, Any]
    config_hash: str


def prepare_suite(settings: Settings, suite_name: str, *, file: str | Path | None = None, initial_id: str | None = None) -> PreparedSuite:
    """The suite's items and config hash; ValueError (one line, with the fix) on a bad suite or file."""
    spec = suites.suite_spec(suite_name)
    e = settings.eval
    config: dict[str, Any] = {"decoding": "greedy", "max_new_tokens": e.max_new_tokens, "max_items": e.max_items}
    if suite_name == suites.SUITE_JSONL:
        source = file or e.jsonl_path
        if not source:
            raise ValueError("the jsonl suite needs a file: pass --file PATH or set eval.jsonl_path")
        path = Path(source)
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the jsonl suite file {path}: {exc.strerror or exc}") from None
        items = suites.parse_items(content, str(path))
    else:
        packaged = suite_name if suite_name in suites.PACKAGED_SUITES else suites.SUITE_INSTRUCT_CHECKS
        content = suites.packaged_text(packaged)
        items = suites.load_packaged(packaged)
    if spec.kind == "pairwise":
        items = _pairwise_items(e.pairwise_prompts)
        config.update(pairwise_prompts=e.pairwise_prompts, initial=initial_id, judge=_judge_config(settings))
    elif e.count_as_failing:  # only when set, so results recorded before the setting keep their hash
        config["count_as_failing"] = sorted(e.count_as_failing)
    if e.max_items is not None:
        items = items[: e.max_items]
    return PreparedSuite(suite_name, items, config, suites.config_hash(suite_name, config, content))


def _pairwise_items(count: int) -> list[suites.SuiteItem]:
    # The bare task stems of instruct-checks (held out from training), in file order.
    tasks = list(dict.fromkeys(item.task or item.prompt for item in suites.load_instruct_checks()))[:count]
    return [suites.SuiteItem(f"task-{index + 1:03d}", task) for index, task in enumerate(tasks)]


def _judge_config(settings: Settings) -> dict[str, Any]:
    # The gate judge's backends and every judge setting (mode, frozen model, endpoint, margin ...).
    snapshot = settings.snapshot()
    return {"gate_judge": snapshot["gate"].get("judge"), "judge": snapshot.get("judge")}


def _resolve(session: Session, checkpoint: Checkpoint | str) -> Checkpoint:
    reference = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
    return suite_results.resolve_checkpoint(session, reference)


def cached_result(
    settings: Settings, sessions: sessionmaker[Session], checkpoint: Checkpoint | str, suite_name: str,
    *, file: str | Path | None = None,
) -> SuiteResult | None:
    with sessions() as session:
        target = _resolve(session, checkpoint)
        initial = lineage.lineage_root(session, target).id
        prepared = prepare_suite(settings, suite_name, file=file, initial_id=initial)
        return suite_results.find_suite_result(session, target.id, suite_name, prepared.config_hash)


def evaluate_checkpoint(
    settings: Settings,
    session_factory: sessionmaker[Session],
    checkpoint: Checkpoint | str,
    suite_name: str,
    *,
    force: bool = False,
    file: str | Path | None = None,
    progress: Progress | None = None,
) -> SuiteResult:
    """Score `checkpoint` (a Checkpoint, an id, "champion" or "initial") on `suite_name` and
    record the row, or return the cached row for the same config hash unless `force`."""
    with session_factory() as session:
        target = _resolve(session, checkpoint)
        initial = lineage.lineage_root(session, target)
        prepared = prepare_suite(settings, suite_name, file=file, initial_id=initial.id)
        cached = suite_results.find_suite_result(session, target.id, suite_name, prepared.config_hash)
    if cached is not None and not force:
        log.info("eval.cached", checkpoint=target.id, suite=suite_name, score=cached.score)
        return cached
    started = time.perf_counter()
    if suites.suite_spec(suite_name).kind == "pairwise":
        payload, summary = _pairwise(settings, target.path, initial.path, prepared, progress)
    else:
        payload, summary = _checks(settings, target.path, prepared, progress)
    seconds = round(time.perf_counter() - started, 3)
    with transaction(session_factory) as session:
        row = suite_results.record_suite_result(
            session, checkpoint_id=target.id, suite=suite_name, config_hash=prepared.config_hash,
            score=summary.score, n=summary.n, ci_low=summary.ci_low, ci_high=summary.ci_high,
            items={**payload, "config": prepared.config}, seconds=seconds,
        )
    log.info("eval.recorded", checkpoint=target.id, suite=suite_name, score=row.score, n=row.n, seconds=seconds)
    return row


class EvaluationError(ValueError):
    """A suite cannot be evaluated (the checkpoint does not load); the message says which and why."""


def greedy_answers(settings: Settings, checkpoint_path: str, prompts: list[str], progress: Progress | None = None) -> list[Generation]:
    """One greedy answer per prompt (a user turn in the checkpoint's chat template)."""
    if artifacts.is_local(checkpoint_path) and artifacts.local_path(checkpoint_path).is_absolute() \
            and not artifacts.local_path(checkpoint_path).exists():
        raise EvaluationError(f"cannot load the checkpoint at {checkpoint_path}: no such directory (moved or deleted?)")
    try:
        runtime = load_runtime(settings, checkpoint_path)
    except (RuntimeError, OSError, ValueError) as exc:  # missing, truncated or corrupted; not a model
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvaluationError(f"cannot load the checkpoint at {checkpoint_path}: {first_line}") from exc
    budget = settings.eval.max_new_tokens
    rendered = [user_prompt(runtime, prompt, budget) for prompt in prompts]
    # An item whose prompt leaves no room for the answer in the model's context gets an empty,
    # unfinished answer: it fails its checks and counts as truncated, it does not stop the suite.
    fitting = [i for i, text in enumerate(rendered) if runtime.fits(text, budget)]
    answers = [Generation(text="", num_tokens=0, finished=False) for _ in prompts]
    if len(fitting) < len(prompts):
        log.warning("eval.over_context", skipped=len(prompts) - len(fitting), context_length=runtime.profile.context_length)
    outputs = runtime.generate(
        [rendered[i] for i in fitting], num_samples=1, max_new_tokens=budget, temperature=0.0,
        batch_size=settings.eval.batch_size, progress=progress, scheduler=settings.generation.scheduler,
    ) if fitting else []
    for index, samples in zip(fitting, outputs, strict=True):
        answers[index] = samples[0]
    return answers


def _truncation(answers: list[Generation]) -> dict[str, Any]:
    cut = sum(not answer.finished for answer in answers)
    return {"truncated": cut, "truncation_rate": cut / len(answers) if answers else 0.0}


def _checks(settings: Settings, path: str, prepared: PreparedSuite, progress: Progress | None):
    answers = greedy_answers(settings, path, [item.prompt for item in prepared.items], progress)
    results = [suites.score_item(item, answer.text) for item, answer in zip(prepared.items, answers, strict=True)]
    items = suites.scored_failing(
        [{**result.to_json(), "tokens": answer.num_tokens, "finished": answer.finished, "loops": loops(answer.text)}
         for result, answer in zip(results, answers, strict=True)],
        settings.eval.count_as_failing,
    )
    # The per-kind rates stay what the checks said; the score counts eval.count_as_failing's answers as failing.
    summary = suites.summarize([replace(result, score=item["score"]) for result, item in zip(results, items, strict=True)])
    looping = sum(item["loops"] for item in items)
    return {"items": items, "per_kind": summary.per_kind, "looping": looping, **_truncation(answers)}, summary


def _pairwise(settings: Settings, path: str, initial_path: str, prepared: PreparedSuite, progress: Progress | None):
    prompts = [item.prompt for item in prepared.items]
    total = 2 * len(prompts)
    answers = greedy_answers(settings, path, prompts, progress and (lambda done, _n: progress(done, total)))
    initial_answers = greedy_answers(
        settings, initial_path, prompts, progress and (lambda done, _n: progress(len(prompts) + done, total))
    )
    # The initial model is the "self" judge here, so every checkpoint is judged by the same model.
    judge = build_judge(
        settings, "gate", policy_path=initial_path, load_model=lambda model_path: load_runtime(settings, model_path),
        initial_path=initial_path, seed=settings.seed,
    )
    comparisons = judge.compare([(p, a.text, b.text) for p, a, b in zip(prompts, answers, initial_answers, strict=True)])
    items = []
    for item, answer, initial_answer, comparison in zip(prepared.items, answers, initial_answers, comparisons, strict=True):
        preference = comparison.preference
        items.append({
            "id": item.id, "prompt": item.prompt, "answer": answer.text, "initial_answer": initial_answer.text,
            "score": preference, "finished": answer.finished,
            "comparison": asdict(comparison) if is_dataclass(comparison) else {"preference": preference},
        })
    scored = [item["score"] for item in items if item["score"] is not None]
    low, high = proportion_ci(sum(scored), len(scored))
    summary = suites.SuiteSummary(sum(scored) / len(scored) if scored else 0.0, len(scored), low, high)
    payload = {"items": items, "unreadable": len(items) - len(scored), **_truncation(answers)}
    return payload, summary


def compare_checkpoints(
    settings: Settings,
    session_factory: sessionmaker[Session],
    checkpoint: Checkpoint | str,
    baseline: Checkpoint | str,
    suite_name: str,
    *,
    file: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[SuiteResult, SuiteResult, suites.PairedDifference]:
    """Both checkpoints' results on `suite_name` (cached ones reused) and checkpoint - baseline,
    item by item: the paired-bootstrap interval (eval.bootstrap_resamples, seeded by `seed`)
    and the smallest difference the items can detect. What the gate and `kaizen eval --against` use."""
    row = evaluate_checkpoint(settings, session_factory, checkpoint, suite_name, file=file, progress=progress)
    base = evaluate_checkpoint(settings, session_factory, baseline, suite_name, file=file, progress=progress)
    paired = suites.paired_difference(row.items["items"], base.items["items"], settings.eval.bootstrap_resamples, seed=settings.seed)
    return row, base, paired
