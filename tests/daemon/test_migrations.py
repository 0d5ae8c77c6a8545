from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, select

from daemon.db.engine import alembic_config, make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Base, Checkpoint
from daemon.db import lineage


def test_empty_db_upgrades_to_head_without_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade_to_head(url)
    tables = set(inspect(make_engine(url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    # `alembic check` raises if the models and the migrations disagree.
    command.check(alembic_config(url))


def test_downgrade_and_upgrade_again_on_a_populated_db(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade_to_head(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path="/m", base_model="tiny", actor="test")
    command.downgrade(alembic_config(url), "base")
    assert "checkpoints" not in inspect(make_engine(url)).get_table_names()
    upgrade_to_head(url)
    with sessions() as session:
        assert session.scalars(select(Checkpoint)).all() == []
