"""Integrity at start: truncated SQLite files, the lineage DB refused, the broker DB renewed."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import embedded_broker_url, load_settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.integrity import DamagedDatabase, check_lineage_db, quick_check, renew_damaged_broker_db
from daemon.logs import configure_logging
from tests.factories import stand_in_checkpoint


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _lineage(tmp_path: Path) -> Path:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    upgrade_to_head(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        lineage.register_initial_champion(session, path=stand_in_checkpoint(tmp_path / "model"), base_model="tiny", actor="test")
        for n in range(200):  # enough pages that half the file cuts through the tables
            session.add(lineage.Event(kind="note", actor="test", reason="x" * 200 + str(n)))
    engine.dispose()  # checkpoints the WAL into the main file
    path = tmp_path / "data" / "lineage.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("command", [["status"], ["run", "--cycles", "1"], ["serve"]])
def test_a_truncated_lineage_db_stops_the_command_with_one_line_and_writes_nothing(tmp_path: Path, command: list[str]) -> None:
    path = _lineage(tmp_path)
    assert quick_check(path) is None
    _truncate(path)
    before = _digest(path.parent)
    result = CliRunner().invoke(app, [*command, "--data-dir", str(path.parent)])
    configure_logging()  # the CLI bound the logs to the runner's stream, closed now
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is damaged" in lines[0] and "restore lineage.db from your backup" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert _digest(path.parent) == before  # nothing written, nothing created


def test_check_lineage_db_passes_a_sound_db_and_a_missing_one(tmp_path: Path) -> None:
    path = _lineage(tmp_path)
    check_lineage_db(f"sqlite:///{path}")
    check_lineage_db(f"sqlite:///{tmp_path / 'absent.db'}")
    _truncate(path)
    with pytest.raises(DamagedDatabase, match="quick_check"):
        check_lineage_db(f"sqlite:///{path}")


def test_a_truncated_broker_db_is_moved_aside_and_a_sound_one_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE kombu_message (id INTEGER PRIMARY KEY, payload TEXT)")
        db.executemany("INSERT INTO kombu_message (payload) VALUES (?)", [("m" * 300,)] * 200)
    url = embedded_broker_url(str(path))
    assert renew_damaged_broker_db(url) is None and path.exists()
    _truncate(path)
    aside = renew_damaged_broker_db(url)
    assert aside is not None and aside.exists() and not path.exists()
    assert aside.name.startswith("broker.db.damaged-")
