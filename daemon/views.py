"""Read models of the lineage for the CLI (and later the dashboard): plain dicts, JSON-ready."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db import lineage
from daemon.db.models import Checkpoint, Evaluation, Iteration, StageRun
from workers.stages import STAGE_ORDER


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def iteration_summary(session: Session, iteration: Iteration) -> dict[str, Any]:
    stages = {s.stage: s for s in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration.id))}
    evaluation = session.scalars(select(Evaluation).where(Evaluation.iteration_id == iteration.id)).one_or_none()
    pairs_result = stages["build_pairs"].result if "build_pairs" in stages else {}
    return {
        "iteration": iteration.id,
        "status": iteration.status.value,
        "parent": iteration.parent_checkpoint_id,
        "candidate": iteration.candidate_checkpoint_id,
        "decision": iteration.decision,
        "started_at": _iso(iteration.started_at),
        "finished_at": _iso(iteration.finished_at),
        "error": iteration.error,
        "stages": {
            name: {
                "status": stages[name].status.value,
                "seconds": stages[name].compute_seconds,
                "attempts": stages[name].attempts,
            }
            for name in STAGE_ORDER
            if name in stages
        },
        "pairs": {k: pairs_result.get(k) for k in ("pairs", "self_reward_pairs", "rlcd_pairs")},
        "gate": None
        if evaluation is None
        else {
            "promote": evaluation.promote,
            "win_rate": evaluation.win_rate,
            "win_rate_lower_bound": evaluation.win_rate_lower_bound,
            "wins": evaluation.wins,
            "losses": evaluation.losses,
            "ties": evaluation.ties,
            "unparseable": evaluation.unparseable,
            "length_ratio": evaluation.length_ratio,
            "reasons": evaluation.reasons.get("reasons", []),
        },
    }


def lineage_view(session: Session) -> dict[str, Any]:
    champion = lineage.current_champion(session)
    checkpoints = session.scalars(select(Checkpoint).order_by(Checkpoint.created_at, Checkpoint.id))
    iterations = session.scalars(select(Iteration).order_by(Iteration.id))
    return {
        "champion": champion.id if champion else None,
        "checkpoints": [
            {"id": c.id, "parent": c.parent_id, "status": c.status.value, "base_model": c.base_model, "path": c.path, "created_at": _iso(c.created_at)}
            for c in checkpoints
        ],
        "iterations": [iteration_summary(session, it) for it in iterations],
    }
