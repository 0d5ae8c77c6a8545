"""The watcher swaps models on pointer changes, keeps the old one on a failed load."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Checkpoint, CheckpointStatus
from daemon.serving.champion import ChampionWatcher


@pytest.fixture()
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade_to_head(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path="/models/a", base_model="a", actor="test")
        for ckpt in ("ckpt-0001", "ckpt-0002"):
            session.add(Checkpoint(id=ckpt, parent_id="ckpt-0000", base_model="a", path=f"/models/{ckpt}", status=CheckpointStatus.candidate, metrics={}))
    return sessions


class Loader:
    """Loads 'models' (their path strings) and fails for paths it was told are broken."""

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.loads: list[str] = []

    def __call__(self, path: str):  # type: ignore[no-untyped-def]
        self.loads.append(path)
        if path in self.broken:
            raise OSError(f"cannot read {path}")
        return f"model@{path}"


def _promote(sessions, checkpoint_id: str) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        lineage.promote(session, checkpoint_id, actor="test", reason=None)


def test_a_promotion_swaps_and_a_held_reference_keeps_the_old_model(sessions) -> None:  # type: ignore[no-untyped-def]
    watcher = ChampionWatcher(sessions, loader=Loader(set()))
    assert watcher.refresh() is True
    in_flight = watcher.current
    assert in_flight.checkpoint_id == "ckpt-0000"
    assert watcher.refresh() is False  # nothing moved: no reload

    _promote(sessions, "ckpt-0001")
    assert watcher.refresh() is True
    assert watcher.current.checkpoint_id == "ckpt-0001"
    assert watcher.current.runtime == "model@/models/ckpt-0001"
    # A request that started before the swap still holds the model it started with.
    assert in_flight.runtime == "model@/models/a"


def test_a_failed_load_keeps_serving_and_is_not_retried_until_the_pointer_moves(sessions) -> None:  # type: ignore[no-untyped-def]
    loader = Loader({"/models/ckpt-0002"})
    watcher = ChampionWatcher(sessions, loader=loader)
    watcher.refresh()
    _promote(sessions, "ckpt-0002")

    assert watcher.refresh() is False
    assert watcher.current.checkpoint_id == "ckpt-0000"
    assert watcher.last_failure.checkpoint_id == "ckpt-0002"
    assert "cannot read" in watcher.last_failure.error
    watcher.refresh()
    assert loader.loads.count("/models/ckpt-0002") == 1

    _promote(sessions, "ckpt-0001")
    assert watcher.refresh() is True
    assert watcher.current.checkpoint_id == "ckpt-0001"
    assert watcher.last_failure is None


def test_a_fresh_server_with_a_broken_champion_serves_the_newest_earlier_champion_that_loads(sessions) -> None:  # type: ignore[no-untyped-def]
    _promote(sessions, "ckpt-0001")
    _promote(sessions, "ckpt-0002")  # champion history: 0000, 0001, 0002
    loader = Loader({"/models/ckpt-0002", "/models/ckpt-0001"})
    watcher = ChampionWatcher(sessions, loader=loader)
    assert watcher.refresh() is True
    assert watcher.current.checkpoint_id == "ckpt-0000"  # 0001 is broken too: the next earlier one
    assert loader.loads == ["/models/ckpt-0002", "/models/ckpt-0001", "/models/a"]
    assert watcher.fallback is not None and watcher.fallback.serving == "ckpt-0000" and watcher.fallback.champion == "ckpt-0002"
    assert "cannot read /models/ckpt-0002" in watcher.fallback.reason
    assert watcher.last_failure.checkpoint_id == "ckpt-0002"
    assert watcher.refresh() is False  # the broken champion is not retried until the pointer moves
    loader.broken.clear()
    with transaction(sessions) as session:
        lineage.rollback(session, actor="test", reason=None)  # back to 0001, which loads now
    assert watcher.refresh() is True
    assert watcher.current.checkpoint_id == "ckpt-0001" and watcher.fallback is None


def test_a_serving_watcher_keeps_its_model_when_the_new_champion_is_broken_and_reports_no_fallback(sessions) -> None:  # type: ignore[no-untyped-def]
    watcher = ChampionWatcher(sessions, loader=Loader({"/models/ckpt-0001"}))
    watcher.refresh()
    _promote(sessions, "ckpt-0001")
    assert watcher.refresh() is False
    assert watcher.current.checkpoint_id == "ckpt-0000" and watcher.fallback is None
