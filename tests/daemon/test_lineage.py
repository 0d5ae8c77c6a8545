from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Checkpoint, CheckpointStatus, Event


@pytest.fixture()
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade_to_head(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        lineage.register_initial_champion(session, path="/models/base", base_model="tiny", actor="test")
    return factory


def _add_candidate(sessions, checkpoint_id: str) -> None:
    with transaction(sessions) as session:
        session.add(
            Checkpoint(id=checkpoint_id, parent_id=lineage.INITIAL_CHECKPOINT_ID, base_model="tiny", path="/x", status=CheckpointStatus.candidate, metrics={})
        )


def test_initial_registration_is_idempotent(sessions) -> None:
    with transaction(sessions) as session:
        again = lineage.register_initial_champion(session, path="/other", base_model="other", actor="test")
    assert again.id == lineage.INITIAL_CHECKPOINT_ID
    assert again.path == "/models/base"


def test_promote_moves_the_pointer_retires_the_old_champion_and_audits(sessions) -> None:
    _add_candidate(sessions, "ckpt-0001")
    with transaction(sessions) as session:
        lineage.promote(session, "ckpt-0001", actor="gate", reason="clear win", iteration_id=None)
    with sessions() as session:
        assert lineage.current_champion(session).id == "ckpt-0001"
        assert session.get(Checkpoint, lineage.INITIAL_CHECKPOINT_ID).status == CheckpointStatus.retired
        event = session.scalars(select(Event).where(Event.kind == "promotion")).one()
        assert (event.checkpoint_id, event.previous_checkpoint_id, event.actor) == ("ckpt-0001", "ckpt-0000", "gate")


def test_promote_of_unknown_or_rejected_checkpoint_is_refused_and_changes_nothing(sessions) -> None:
    _add_candidate(sessions, "ckpt-0001")
    with transaction(sessions) as session:
        lineage.reject(session, "ckpt-0001", actor="gate", reason="lost", iteration_id=None)
    for bad in ("ckpt-9999", "ckpt-0001"):
        with pytest.raises(lineage.LineageError):
            with transaction(sessions) as session:
                lineage.promote(session, bad, actor="op", reason=None)
    with sessions() as session:
        assert lineage.current_champion(session).id == lineage.INITIAL_CHECKPOINT_ID
        assert session.scalars(select(Event).where(Event.kind == "promotion")).all() == []
