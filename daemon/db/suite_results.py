"""Suite results in the lineage: find, record and summarise a checkpoint's evaluation scores.

Torch-free: the CLI's views and the dashboard read scores from here; workers/evaluation.py
computes and records them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from daemon.db import lineage
from daemon.db.models import Checkpoint, SuiteResult, utcnow

CHECKPOINT_ALIASES = ("champion", "initial")


def resolve_checkpoint(session: Session, reference: str) -> Checkpoint:
    """A checkpoint id, "champion" (the current one) or "initial" (the first model of the
    champion's lineage); LineageError names the fix when there is no such checkpoint."""
    champion = lineage.current_champion(session)
    if reference in CHECKPOINT_ALIASES:
        if champion is None:
            raise lineage.LineageError("no champion yet: run `kaizen init` first")
        return champion if reference == "champion" else lineage.lineage_root(session, champion)
    checkpoint = session.get(Checkpoint, reference)
    if checkpoint is None:
        raise lineage.LineageError(
            f"unknown checkpoint {reference!r}; give an id from `kaizen lineage`, 'champion' or 'initial'"
        )
    return checkpoint


def find_suite_result(session: Session, checkpoint_id: str, suite: str, config_hash: str) -> SuiteResult | None:
    return session.scalars(
        select(SuiteResult).where(
            SuiteResult.checkpoint_id == checkpoint_id, SuiteResult.suite == suite, SuiteResult.config_hash == config_hash
        )
    ).one_or_none()


def record_suite_result(
    session: Session,
    *,
    checkpoint_id: str,
    suite: str,
    config_hash: str,
    score: float,
    n: int,
    ci_low: float,
    ci_high: float,
    items: dict[str, Any],
    seconds: float | None,
) -> SuiteResult:
    """Insert the row, or overwrite the one with the same (checkpoint, suite, config hash):
    a forced re-evaluation replaces the cached result instead of failing on the unique key."""
    row = find_suite_result(session, checkpoint_id, suite, config_hash)
    if row is None:
        row = SuiteResult(checkpoint_id=checkpoint_id, suite=suite, config_hash=config_hash)
        session.add(row)
    row.score, row.n, row.ci_low, row.ci_high = score, n, ci_low, ci_high
    row.items, row.seconds, row.created_at = items, seconds, utcnow()
    session.flush()
    return row


def summary_of(row: SuiteResult) -> dict[str, Any]:
    """What the views show of a result (no per-item answers)."""
    return {
        "suite": row.suite, "score": row.score, "n": row.n, "ci_low": row.ci_low, "ci_high": row.ci_high,
        "config_hash": row.config_hash, "seconds": row.seconds, "created_at": _iso(row.created_at),
    }


def report_of(row: SuiteResult) -> dict[str, Any]:
    """The summary plus what the per-item payload adds up to (per-kind rates, truncation)."""
    payload = row.items or {}
    extra = {key: payload[key] for key in ("per_kind", "truncation_rate", "looping", "unreadable") if key in payload}
    return {"checkpoint": row.checkpoint_id, **summary_of(row), **extra}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def latest_scores(session: Session, checkpoint_ids: Iterable[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{checkpoint id: {suite: summary}}, the newest result per (checkpoint, suite) whatever its
    config hash. The per-item column is not read."""
    query = select(SuiteResult).options(defer(SuiteResult.items)).order_by(SuiteResult.created_at, SuiteResult.id)
    if checkpoint_ids is not None:
        query = query.where(SuiteResult.checkpoint_id.in_(list(checkpoint_ids)))
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for row in session.scalars(query):
        scores.setdefault(row.checkpoint_id, {})[row.suite] = summary_of(row)
    return scores


def champion_score_history(session: Session) -> dict[str, list[dict[str, Any]]]:
    """{suite: [{checkpoint, score, ci_low, ci_high}, ...]} along the champion history (the
    champion stack, initial first, current last), for the checkpoints that were evaluated."""
    history = lineage.champion_history(session)
    ordered = list(dict.fromkeys(history))
    scores = latest_scores(session, ordered)
    series: dict[str, list[dict[str, Any]]] = {}
    for checkpoint_id in ordered:
        for suite, summary in sorted(scores.get(checkpoint_id, {}).items()):
            series.setdefault(suite, []).append(
                {"checkpoint": checkpoint_id, "score": summary["score"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"]}
            )
    return series
