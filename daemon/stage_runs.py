"""A stage run's vocabulary: its context and output, why a delivery is dropped, and the input hash.

The lineage DB keys a stage result by (iteration, stage, input hash); the hash digests what the
stage reads (see daemon/stage_runner.py for claims, leases and the fenced commit). Torch-free:
the daemon, the Celery parent process and the stages all use these.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.db.models import Iteration, StageRun, StageStatus, utcnow

log = structlog.get_logger(__name__)

Writer = Callable[[Session], dict[str, Any]]


class StageDeliveryDropped(Exception):
    """This delivery of a stage must not compute it; the message can be acknowledged."""


class StageHeldElsewhere(StageDeliveryDropped):
    """Another live worker holds the stage's lease and is computing it."""


class LeaseLost(StageDeliveryDropped):
    """This worker's lease was taken over while it computed; its outputs were discarded."""


class StageNotReady(StageDeliveryDropped):
    """An upstream stage has not succeeded yet: a stale or out-of-order message."""


class StaleStageMessage(StageDeliveryDropped):
    """The message was sent for other inputs than the lineage DB now holds."""


class IterationNotRunning(StageDeliveryDropped):
    """The stage's iteration is parked, failed or completed: nothing of it runs any more."""


class StageGaveUp(StageDeliveryDropped):
    """The stage was claimed worker.max_stage_attempts times without finishing; it failed for good."""


class StageInterrupted(Exception):
    """The worker is shutting down: the stage saved what it had (trainer state) and hands itself
    over unfinished, for the next worker to resume. Not a failure: it counts no attempt."""


GAVE_UP_EVENT = "stage_gave_up"


class StageInputMismatch(RuntimeError):
    """A stored result was computed from other inputs than the stage has now."""


@dataclass
class StageOutput:
    """What a stage computed: a summary, and a function that writes its rows in the final transaction."""

    result: dict[str, Any]
    write: Writer = field(default=lambda _session: {})


@dataclass
class StageContext:
    settings: Settings
    sessions: sessionmaker[Session]
    iteration_id: int

    def iteration(self, session: Session) -> Iteration:
        iteration = session.get(Iteration, self.iteration_id)
        if iteration is None:
            raise LookupError(f"iteration {self.iteration_id} does not exist")
        return iteration


StageFn = Callable[[StageContext], StageOutput]


def recorded_context(ctx: StageContext) -> StageContext:
    """``ctx`` with the settings its iteration recorded, overlaid with this machine's local keys
    (daemon.config.MACHINE_LOCAL_KEYS): what the stage computes matches the lineage's config."""
    with ctx.sessions() as session:
        snapshot = ctx.iteration(session).config_snapshot
    return replace(ctx, settings=ctx.settings.for_iteration(snapshot))


def new_worker_id() -> str:
    """Unique per delivery: host and pid say who, the suffix tells two deliveries in one process apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands timezone-aware columns back naive; they were stored in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def lease_is_live(row: StageRun, now: datetime | None = None) -> bool:
    expires = as_utc(row.lease_expires_at)
    return row.status == StageStatus.running and row.worker_id is not None and expires is not None and expires > (now or utcnow())


# --------------------------------------------------------------------------- input hash


def digest_inputs(inputs: dict[str, Any]) -> str:
    """SHA-256 of a canonical JSON rendering: equal inputs give equal hashes on every machine."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def stage_input_hash(session: Session, iteration_id: int, stage: str) -> str:
    """The hash of everything ``stage`` of ``iteration_id`` reads; raises StageNotReady if an
    upstream stage has not succeeded."""
    from daemon.stage_specs import STAGE_ORDER

    iteration = session.get(Iteration, iteration_id)
    if iteration is None:
        raise LookupError(f"iteration {iteration_id} does not exist")
    if stage not in STAGE_ORDER:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")
    rows = {
        r.stage: r
        for r in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage.in_(STAGE_ORDER[: STAGE_ORDER.index(stage)])))
    }
    return digest_stage_inputs(iteration_id, stage, iteration.parent_checkpoint_id, iteration.config_snapshot, rows)


def digest_stage_inputs(iteration_id: int, stage: str, parent_checkpoint_id: str | None, config: Mapping[str, Any], rows: Mapping[str, Any]) -> str:
    """The input hash from the iteration's values and its stage ``rows`` (stage name -> anything
    with ``status``, ``input_hash`` and ``result``). Apart from the session so that a migration
    re-hashing rows it rewrote computes exactly what a claim compares against."""
    from daemon.stage_specs import OPTIONAL_STAGES, STAGE_ORDER

    # An optional stage the iteration was started without has no row: it is not upstream.
    upstream_names = [name for name in STAGE_ORDER[: STAGE_ORDER.index(stage)] if name in rows or name not in OPTIONAL_STAGES]
    upstream = []
    for name in upstream_names:
        row = rows.get(name)
        if row is None or row.status != StageStatus.succeeded:
            raise StageNotReady(f"iteration {iteration_id}: {stage} needs {name}, which has not succeeded yet")
        upstream.append({"stage": name, "input_hash": row.input_hash, "result": row.result})
    return digest_inputs(
        {"iteration": iteration_id, "stage": stage, "parent_checkpoint": parent_checkpoint_id, "config": config, "upstream": upstream}
    )
