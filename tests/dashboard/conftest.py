from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, load_settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, upgrade_to_head
from daemon.db.models import Checkpoint, Event
from tests.factories import give_checkpoints_stand_in_files

TOKEN = "correct horse battery staple"


@dataclass
class Seeded:
    settings: Settings
    sessions: sessionmaker[Session]

    def champion(self) -> str:
        with self.sessions() as session:
            return lineage.current_champion(session).id

    def checkpoints(self) -> list[Checkpoint]:
        with self.sessions() as session:
            return list(session.scalars(select(Checkpoint).order_by(Checkpoint.created_at)))

    def events(self, kind: str) -> list[Event]:
        with self.sessions() as session:
            return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))

    def promotable(self) -> str:
        """A former champion: accepted, not the current one."""
        retired = [c.id for c in self.checkpoints() if c.status.value == "retired"]
        assert retired, "the seeded lineage needs at least one former champion"
        return retired[-1]

    def rejected(self) -> str:
        return next(c.id for c in self.checkpoints() if c.status.value == "rejected")


def seed(tmp_path: Path, token: str | None = TOKEN, iterations: int = 14) -> Seeded:
    from ops.bench.lineage_seed import seed_lineage

    dashboard: dict[str, Any] = {"token": token} if token else {}
    settings = load_settings(None, data_dir=str(tmp_path / "data"), dashboard=dashboard)
    upgrade_to_head(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    seed_lineage(engine, iterations, 12, seed=5)  # seed 5: two promotions, twelve rejections
    sessions = make_session_factory(engine)
    give_checkpoints_stand_in_files(sessions, tmp_path / "checkpoints")  # promote and rollback verify them
    return Seeded(settings, sessions)


@pytest.fixture()
def seeded(tmp_path: Path) -> Seeded:
    return seed(tmp_path)


@pytest.fixture()
def seeded_without_token(tmp_path: Path) -> Seeded:
    return seed(tmp_path, token=None)
