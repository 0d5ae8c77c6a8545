"""ops.bench.dashboard end to end on SQLite (the timings themselves are not asserted: they are
the benchmark's output), and the synthetic lineage it seeds: reproducible and consistent."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from sqlalchemy import select, text

from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, upgrade_to_head
from daemon.db.models import Checkpoint, CheckpointStatus
from ops.bench import dashboard
from ops.bench.dashboard_queries import dashboard_queries
from ops.bench.lineage_seed import seed_lineage

SMALL = ["--backends", "sqlite", "--iterations", "30", "--judgments", "600", "--repeat", "2"]


def test_the_benchmark_seeds_a_lineage_and_reports_every_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "lineage.db"
    assert dashboard.main([*SMALL, "--sqlite-path", str(db)]) in (0, 1)  # 1: a p95 over target on a loaded machine
    out = capsys.readouterr().out
    assert "iterations 30, " in out and "judgments 600, " in out
    rows = [re.fullmatch(r"sqlite +(.+?) +[\d.]+ +[\d.]+  (ok|SLOW)", line) for line in out.splitlines() if line.startswith("sqlite ")]
    assert [row.group(1) for row in rows if row] == list(dashboard_queries(30, random.Random(0)))

    # --reuse times the same database again without seeding it.
    assert dashboard.main([*SMALL, "--sqlite-path", str(db), "--reuse"]) in (0, 1)
    out = capsys.readouterr().out
    assert "reusing 600 judgments" in out and "seeded" not in out


def test_an_unknown_backend_is_refused_before_anything_is_seeded(tmp_path: Path) -> None:
    db = tmp_path / "lineage.db"
    with pytest.raises(SystemExit) as exited:
        dashboard.main([*SMALL, "--backends", "sqlite,mysql", "--sqlite-path", str(db)])
    assert exited.value.code == 2 and not db.exists()


def _seeded_rows(path: Path, seed: int) -> dict[str, list[tuple]]:
    url = f"sqlite:///{path}"
    upgrade_to_head(url)
    engine = make_engine(url)
    seed_lineage(engine, 40, 16, seed=seed)
    with engine.connect() as conn:
        # The lineage's identity is a fresh uuid per database by design (migration 0007), not seeded data.
        tables = conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('alembic_version', 'lineage_identity')"
        )).scalars().all()
        rows = {name: [tuple(row) for row in conn.execute(text(f'SELECT * FROM "{name}" ORDER BY 1'))] for name in tables}
    engine.dispose()
    return rows


def test_the_same_seed_gives_the_same_lineage_and_another_seed_another(tmp_path: Path) -> None:
    first, again, other = (_seeded_rows(tmp_path / f"{name}.db", seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert first == again
    assert first["iterations"] != other["iterations"]


def test_the_seeded_lineage_has_one_champion_at_the_top_of_its_stack(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade_to_head(url)
    summary = seed_lineage(make_engine(url), 40, 16, seed=7)
    with make_session_factory(make_engine(url))() as session:
        champions = session.scalars(select(Checkpoint.id).where(Checkpoint.status == CheckpointStatus.champion)).all()
        assert champions == [summary.champion] == [lineage.current_champion(session).id]
        assert lineage.champion_history(session)[-1] == summary.champion
        retired = session.scalars(select(Checkpoint.id).where(Checkpoint.status == CheckpointStatus.retired)).all()
        assert set(retired) == set(lineage.champion_history(session)[:-1])
