"""The lineage schema: the source of truth for every checkpoint, cycle, datum and decision."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Enum, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints let Alembic's batch mode rebuild SQLite tables deterministically.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


NUL_REPLACEMENT = "\ufffd"


@event.listens_for(Base, "before_insert", propagate=True)
@event.listens_for(Base, "before_update", propagate=True)
def _replace_nul_characters(_mapper: Any, _connection: Any, target: Base) -> None:
    """PostgreSQL text cannot hold NUL; a model's raw output can (byte-level tokenizers). Store
    U+FFFD in its place, on every database, so the lineage reads the same on SQLite and PostgreSQL."""
    for attr in sa_inspect(target).mapper.column_attrs:
        value = getattr(target, attr.key, None)
        if isinstance(value, str) and "\x00" in value:
            setattr(target, attr.key, value.replace("\x00", NUL_REPLACEMENT))


class CheckpointStatus(str, enum.Enum):
    candidate = "candidate"
    champion = "champion"
    retired = "retired"
    rejected = "rejected"


class IterationStatus(str, enum.Enum):
    running = "running"
    completed = "completed"
    failed = "failed"


class StageStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, validate_strings=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(512))
    path: Mapped[str] = mapped_column(String(1024))
    adapter_path: Mapped[str | None] = mapped_column(String(1024))
    status: Mapped[CheckpointStatus] = mapped_column(_enum(CheckpointStatus), index=True)
    created_iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iterations.id", use_alter=True))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The model profile (policies.model_profile): context length, prompt format, special tokens, stops.
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChampionPointer(Base):
    """A single row (id=1): which checkpoint is served and improved. Changed in one transaction."""

    __tablename__ = "champion"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Iteration(Base):
    __tablename__ = "iterations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    parent_checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    candidate_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    status: Mapped[IterationStatus] = mapped_column(_enum(IterationStatus), index=True)
    decision: Mapped[str | None] = mapped_column(String(16))
    config_snapshot: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class StageRun(Base):
    """One stage of one iteration; its result is stored with its outputs in one transaction."""

    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("iteration_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"))
    stage: Mapped[str] = mapped_column(String(32))
    status: Mapped[StageStatus] = mapped_column(_enum(StageStatus))
    attempts: Mapped[int] = mapped_column(default=0)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    compute_seconds: Mapped[float | None] = mapped_column(Float)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Exactly-once over at-least-once delivery (daemon/stage_runner.py): the result is keyed by
    # (iteration, stage, input_hash), and a claim is a lease: the worker that holds it renews
    # lease_expires_at while it computes; a delivery that finds the lease expired takes over.
    input_hash: Mapped[str | None] = mapped_column(String(64))
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (Index("ix_prompts_iteration_role", "iteration_id", "role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"))
    text: Mapped[str] = mapped_column(Text)
    # train: generated for this cycle's pairs; heldout: used only by the gate.
    role: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    # The verifiable constraints an answer must satisfy (policies.constraints JSON objects, e.g.
    # {"kind": "max_words", "n": 40}); null or empty for a free-form prompt. The verifier judge reads them.
    constraints: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (Index("ix_responses_iteration_prompt", "iteration_id", "prompt_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    # policy: a plain sample; rlcd_positive / rlcd_negative: answered under a principle.
    kind: Mapped[str] = mapped_column(String(16))
    principle: Mapped[str | None] = mapped_column(String(64))
    sample_index: Mapped[int] = mapped_column(default=0)
    text: Mapped[str] = mapped_column(Text)
    num_tokens: Mapped[int] = mapped_column(default=0)


class Judgment(Base):
    __tablename__ = "judgments"
    # (iteration, score) covers the per-iteration score histograms of the dashboard (revision 0002).
    __table_args__ = (Index("ix_judgments_iteration_score", "iteration_id", "score"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"))
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), index=True)
    sample_index: Mapped[int] = mapped_column(default=0)
    raw_output: Mapped[str] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    parse_error: Mapped[str | None] = mapped_column(String(256))
    # Which judge made it (workers/judges: "self:logprob", "verifier+self:logprob", "openai:<model>" ...);
    # null for judgments recorded before judges were named.
    judge: Mapped[str | None] = mapped_column(String(128))


class Pair(Base):
    __tablename__ = "pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    chosen_response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    rejected_response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    kind: Mapped[str] = mapped_column(String(16))
    score_gap: Mapped[float | None] = mapped_column(Float)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"), unique=True)
    candidate_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    champion_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"))
    promote: Mapped[bool]
    wins: Mapped[int] = mapped_column(default=0)
    losses: Mapped[int] = mapped_column(default=0)
    ties: Mapped[int] = mapped_column(default=0)
    unparseable: Mapped[int] = mapped_column(default=0)
    win_rate: Mapped[float | None] = mapped_column(Float)
    win_rate_lower_bound: Mapped[float | None] = mapped_column(Float)
    length_ratio: Mapped[float | None] = mapped_column(Float)
    parse_failure_rate: Mapped[float | None] = mapped_column(Float)
    reasons: Mapped[dict[str, Any]] = mapped_column(default=dict)
    comparisons: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SuiteResult(Base):
    """A checkpoint's score on one evaluation suite (workers/evaluation.py), one row per
    (checkpoint, suite, config hash): the hash covers what changes results (the suite's items,
    the decoding settings), so a cached row is reused until one of those changes."""

    __tablename__ = "suite_results"
    __table_args__ = (UniqueConstraint("checkpoint_id", "suite", "config_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    suite: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    ci_low: Mapped[float] = mapped_column(Float)
    ci_high: Mapped[float] = mapped_column(Float)
    # {"items": [{id, answer, passed, score, ...}], "per_kind": {kind: rate}, "config": {...}, ...}
    items: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Promotions, rollbacks, rejections and manual actions: who, when, why."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    previous_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iterations.id"))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DaemonControl(Base):
    """A single row (id=1): operator switches the daemon obeys. No row means not paused.

    Kept in the lineage DB, not in the daemon's memory, so `kaizen pause` works from any machine
    that reaches the DB and survives a daemon restart.
    """

    __tablename__ = "daemon_control"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    paused: Mapped[bool] = mapped_column(default=False)
    changed_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChampionStackEntry(Base):
    """The champions a rollback can return to, bottom first; the top row is the current champion.

    A promotion pushes; a rollback to X drops the rows above X's top-most entry. Kept as rows
    (not replayed from events) so the rollback target is one indexed lookup on any lineage size.
    """

    __tablename__ = "champion_stack"

    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"))


class LineageIdentity(Base):
    """A single row (id=1): the lineage's uuid, made once when its DB is migrated (revision 0007).

    Stage messages carry it and each lineage has Celery queues of its own named after it
    (workers/celery_app.py), so two lineages sharing one broker never take each other's stages.
    """

    __tablename__ = "lineage_identity"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

# Indexes for the dashboard's and /metrics' queries (measured by ops/bench/dashboard.py), declared
# here so the tables above stay as the first migration made them. Each covers its query: the
# database answers from the index without reading the wide rows (config snapshots, stage results).
Index("ix_iterations_status_decision", Iteration.status, Iteration.decision)
Index("ix_checkpoints_created_at", Checkpoint.created_at)
Index("ix_stage_runs_status_stage", StageRun.status, StageRun.stage, StageRun.compute_seconds)
