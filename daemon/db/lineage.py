"""Lineage operations that must stay consistent: the champion pointer, promotions, rejections."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import ChampionPointer, Checkpoint, CheckpointStatus, Event, utcnow

CHAMPION_ROW_ID = 1
INITIAL_CHECKPOINT_ID = "ckpt-0000"


class LineageError(Exception):
    """A lineage change that would break an invariant (unknown id, rejected checkpoint, ...)."""


def candidate_checkpoint_id(iteration_id: int) -> str:
    """One candidate per iteration, so its id is derived from the iteration: re-runs reuse it."""
    return f"ckpt-{iteration_id:04d}"


def current_champion(session: Session, *, for_update: bool = False) -> Checkpoint | None:
    query = select(ChampionPointer).where(ChampionPointer.id == CHAMPION_ROW_ID)
    if for_update:
        query = query.with_for_update()
    pointer = session.scalars(query).one_or_none()
    return session.get(Checkpoint, pointer.checkpoint_id) if pointer else None


def register_initial_champion(session: Session, *, path: str, base_model: str, actor: str) -> Checkpoint:
    """Make ``path`` the first champion; a no-op returning the champion when one exists."""
    existing = current_champion(session)
    if existing is not None:
        return existing
    checkpoint = Checkpoint(
        id=INITIAL_CHECKPOINT_ID, base_model=base_model, path=path, status=CheckpointStatus.champion, metrics={}
    )
    session.add(checkpoint)
    session.flush()
    session.add(ChampionPointer(id=CHAMPION_ROW_ID, checkpoint_id=checkpoint.id))
    session.add(Event(kind="init", checkpoint_id=checkpoint.id, actor=actor, reason=f"initial model {base_model}"))
    return checkpoint


def promote(
    session: Session, checkpoint_id: str, *, actor: str, reason: str | None, kind: str = "promotion", iteration_id: int | None = None
) -> Checkpoint:
    """Point the champion at ``checkpoint_id``; the caller's transaction makes it atomic."""
    target = session.get(Checkpoint, checkpoint_id)
    if target is None:
        raise LineageError(f"unknown checkpoint {checkpoint_id!r}; `kaizen lineage` lists the known ones")
    if target.status == CheckpointStatus.rejected:
        raise LineageError(f"checkpoint {checkpoint_id} was rejected by the gate and cannot be promoted")
    pointer = session.scalars(
        select(ChampionPointer).where(ChampionPointer.id == CHAMPION_ROW_ID).with_for_update()
    ).one_or_none()
    if pointer is None:
        raise LineageError("no champion yet: run `kaizen init` first")
    previous = session.get(Checkpoint, pointer.checkpoint_id)
    if previous is not None and previous.id != target.id:
        previous.status = CheckpointStatus.retired
    target.status = CheckpointStatus.champion
    pointer.checkpoint_id = target.id
    pointer.updated_at = utcnow()
    session.add(
        Event(
            kind=kind,
            checkpoint_id=target.id,
            previous_checkpoint_id=previous.id if previous else None,
            iteration_id=iteration_id,
            actor=actor,
            reason=reason,
        )
    )
    return target


def reject(session: Session, checkpoint_id: str, *, actor: str, reason: str, iteration_id: int | None) -> None:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise LineageError(f"unknown checkpoint {checkpoint_id!r}")
    checkpoint.status = CheckpointStatus.rejected
    session.add(Event(kind="rejection", checkpoint_id=checkpoint_id, iteration_id=iteration_id, actor=actor, reason=reason))
