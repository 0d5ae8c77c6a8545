"""Lineage operations that must stay consistent: the champion pointer, promotions, rejections."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from daemon.db.models import (
    ChampionPointer, ChampionStackEntry, Checkpoint, CheckpointStatus, DaemonControl, Event, Iteration, IterationStatus, LineageIdentity,
    utcnow,
)

CHAMPION_ROW_ID = 1
INITIAL_CHECKPOINT_ID = "ckpt-0000"
CONTROL_ROW_ID = 1
IDENTITY_ROW_ID = 1
# Event kinds that move the champion pointer, in the order they are replayed to find the history.
INITIAL_EVENT = "init"
GATE_PROMOTION_EVENT = "promotion"
MANUAL_PROMOTION_EVENT = "manual_promotion"
ROLLBACK_EVENT = "rollback"
PAUSE_EVENT = "pause"
RESUME_EVENT = "resume"


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


def register_initial_champion(
    session: Session, *, path: str, base_model: str, actor: str, profile: dict[str, Any] | None = None
) -> Checkpoint:
    """Make ``path`` the first champion (with its model ``profile``); a no-op returning the champion when one exists."""
    existing = current_champion(session)
    if existing is not None:
        return existing
    checkpoint = Checkpoint(
        id=INITIAL_CHECKPOINT_ID, base_model=base_model, path=path, status=CheckpointStatus.champion, metrics={}, profile=profile
    )
    session.add(checkpoint)
    session.flush()
    session.add(ChampionPointer(id=CHAMPION_ROW_ID, checkpoint_id=checkpoint.id))
    event = Event(kind=INITIAL_EVENT, checkpoint_id=checkpoint.id, actor=actor, reason=f"initial model {base_model}")
    session.add(event)
    _push_champion(session, checkpoint.id, event, below=None)
    return checkpoint


def promote(
    session: Session, checkpoint_id: str, *, actor: str, reason: str | None, kind: str = GATE_PROMOTION_EVENT, iteration_id: int | None = None
) -> Checkpoint:
    """Point the champion at ``checkpoint_id``; the caller's transaction makes it atomic.

    Every kind but a rollback also pushes the new champion on the champion stack, so a later
    rollback returns to the champion it replaced.
    """
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
    event = Event(
        kind=kind,
        checkpoint_id=target.id,
        previous_checkpoint_id=previous.id if previous else None,
        iteration_id=iteration_id,
        actor=actor,
        reason=reason,
    )
    session.add(event)
    if kind != ROLLBACK_EVENT and (previous is None or previous.id != target.id):
        _push_champion(session, target.id, event, below=previous.id if previous else None)
    return target


def _stack_top(session: Session, count: int = 1) -> list[ChampionStackEntry]:
    return list(session.scalars(select(ChampionStackEntry).order_by(ChampionStackEntry.position.desc()).limit(count)))


def _push_champion(session: Session, checkpoint_id: str, event: Event, *, below: str | None) -> None:
    session.flush()  # assigns event.id
    top = _stack_top(session)
    if not top and below is not None:
        # A lineage whose stack is empty (rows written around these functions): start it from
        # the champion being replaced, so a rollback can still return to it.
        session.add(ChampionStackEntry(position=0, checkpoint_id=below, event_id=None))
        session.flush()
        top = _stack_top(session)
    position = top[0].position + 1 if top else 0
    session.add(ChampionStackEntry(position=position, checkpoint_id=checkpoint_id, event_id=event.id))


def reject(session: Session, checkpoint_id: str, *, actor: str, reason: str, iteration_id: int | None) -> None:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise LineageError(f"unknown checkpoint {checkpoint_id!r}")
    checkpoint.status = CheckpointStatus.rejected
    session.add(Event(kind="rejection", checkpoint_id=checkpoint_id, iteration_id=iteration_id, actor=actor, reason=reason))


def lineage_root(session: Session, checkpoint: Checkpoint) -> Checkpoint:
    """The first model of ``checkpoint``'s lineage (following parents to the one without)."""
    seen = {checkpoint.id}
    while checkpoint.parent_id is not None:
        parent = session.get(Checkpoint, checkpoint.parent_id)
        assert parent is not None and parent.id not in seen, "checkpoint parents form a tree by foreign key"
        seen.add(parent.id)
        checkpoint = parent
    return checkpoint


def gate_promotion_blocker(session: Session, parent_id: str) -> str | None:
    """Why the gate must not promote a candidate trained from ``parent_id``, or None.

    A candidate is judged against the champion it was trained from; if an operator promoted or
    rolled back in the meantime, promoting it would silently undo that manual decision.
    """
    champion = current_champion(session, for_update=True)
    if champion is None or champion.id == parent_id:
        return None
    return f"the champion changed from {parent_id} to {champion.id} while this iteration ran"


# ---------------------------------------------------------------- operator actions


def champion_history(session: Session) -> list[str]:
    """The champion stack, bottom first: the champions a rollback walks back through, the current one last.

    A promotion pushes its checkpoint; a rollback returns to an earlier entry and drops the ones
    above it, so rolling back twice goes two steps back instead of toggling between two champions.
    """
    return list(session.scalars(select(ChampionStackEntry.checkpoint_id).order_by(ChampionStackEntry.position)))


def rollback_target(session: Session) -> str | None:
    """The champion a plain `kaizen rollback` would restore, or None (two indexed rows, any lineage size)."""
    top = _stack_top(session, 2)
    return top[1].checkpoint_id if len(top) == 2 else None


def manual_promote(session: Session, checkpoint_id: str, *, actor: str, reason: str | None) -> tuple[Checkpoint, str | None]:
    """An operator's promotion: (new champion, previous champion id). Refuses a no-op."""
    previous = current_champion(session, for_update=True)
    if previous is not None and previous.id == checkpoint_id:
        raise LineageError(f"{checkpoint_id} is already the champion; nothing to do")
    pending = session.scalars(
        select(Iteration.id).where(Iteration.candidate_checkpoint_id == checkpoint_id, Iteration.status == IterationStatus.running)
    ).first()
    if pending is not None:
        # Its gate has yet to run and would then judge (and possibly reject) the champion itself.
        raise LineageError(
            f"{checkpoint_id} is the candidate of iteration {pending}, which is still running; "
            "wait for its gate decision (or `kaizen pause` and let it finish) before promoting it by hand"
        )
    target = promote(session, checkpoint_id, actor=actor, reason=reason, kind=MANUAL_PROMOTION_EVENT)
    return target, previous.id if previous else None


def rollback(session: Session, *, actor: str, reason: str | None, to: str | None = None) -> tuple[Checkpoint, str]:
    """Make an earlier champion the champion again: (restored champion, the champion it replaced).

    ``to=None`` restores the champion before the current one. ``to`` must name a checkpoint that
    was champion before; use `kaizen promote` for any other. The caller's transaction makes the
    pointer move, the status changes and the audit event one atomic change.
    """
    current = current_champion(session, for_update=True)
    if current is None:
        raise LineageError("no champion yet: run `kaizen init` first")
    top = _stack_top(session)
    if not top or top[0].checkpoint_id != current.id:
        # The pointer was moved around these functions (a hand-edited DB): the current champion
        # still is where a rollback starts from.
        session.add(ChampionStackEntry(position=top[0].position + 1 if top else 0, checkpoint_id=current.id, event_id=None))
        session.flush()
        top = _stack_top(session)
    if to == current.id:
        raise LineageError(f"{to} is already the champion; nothing to roll back")
    earlier = select(func.max(ChampionStackEntry.position)).where(ChampionStackEntry.position < top[0].position)
    if to is not None:
        earlier = earlier.where(ChampionStackEntry.checkpoint_id == to)
    position = session.scalar(earlier)
    if position is None and to is None:
        raise LineageError(
            f"nothing to roll back to: {current.id} is the first champion this lineage has had "
            "(`kaizen lineage` shows the history; `kaizen promote CHECKPOINT` picks any accepted checkpoint)"
        )
    if position is None:
        recent = [entry.checkpoint_id for entry in _stack_top(session, 11)[1:]]
        known = ", ".join(recent) + (", ..." if len(recent) == 10 else "") if recent else "none"
        raise LineageError(
            f"{to} was never champion, so there is nothing to roll back to (earlier champions: {known}); "
            "use `kaizen promote` to make another checkpoint champion"
        )
    target_id = session.scalars(select(ChampionStackEntry.checkpoint_id).where(ChampionStackEntry.position == position)).one()
    session.execute(delete(ChampionStackEntry).where(ChampionStackEntry.position > position))
    restored = promote(session, target_id, actor=actor, reason=reason, kind=ROLLBACK_EVENT)
    return restored, current.id


@dataclass(frozen=True)
class PauseState:
    paused: bool
    changed_by: str | None
    changed_at: datetime | None
    reason: str | None


def pause_state(session: Session) -> PauseState:
    row = session.get(DaemonControl, CONTROL_ROW_ID)
    if row is None:
        return PauseState(False, None, None, None)
    return PauseState(row.paused, row.changed_by, row.changed_at, row.reason)


def set_paused(session: Session, paused: bool, *, actor: str, reason: str | None) -> bool:
    """Pause or resume the daemon; False (and no event) when it already was in that state."""
    row = session.scalars(select(DaemonControl).where(DaemonControl.id == CONTROL_ROW_ID).with_for_update()).one_or_none()
    if row is not None and row.paused == paused:
        return False
    if row is None:
        if not paused:
            return False
        row = DaemonControl(id=CONTROL_ROW_ID, paused=paused, changed_by=actor)
        session.add(row)
    row.paused = paused
    row.changed_by = actor
    row.reason = reason
    row.changed_at = utcnow()
    session.add(Event(kind=PAUSE_EVENT if paused else RESUME_EVENT, actor=actor, reason=reason))
    return True


def lineage_uuid(session: Session) -> str | None:
    """The lineage's uuid (revision 0007 made it); None before the DB is migrated that far."""
    row = session.get(LineageIdentity, IDENTITY_ROW_ID)
    return row.uuid if row else None
