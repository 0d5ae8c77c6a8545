from __future__ import annotations

from pathlib import Path

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select

from daemon.config import MASK, load_settings, redact_snapshot
from daemon.dashboard import create_dashboard_app
from daemon.db.engine import alembic_config, make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Base, Checkpoint, Iteration, IterationStatus, StageRun, StageStatus
from daemon.db import lineage
from daemon.stage_runs import stage_input_hash


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


# ---------------------------------------------------------------- 0008: secrets recorded in clear

CLEAR = {
    "serve api key": "sk-clear-api-key-0008",
    "db password": "dbpw-clear-0008",
    "broker password": "brpw-clear-0008",
    "judge url password": "jdpw-clear-0008",
}


def _snapshot_as_old_versions_recorded(data_dir: Path) -> dict:
    """What Settings.snapshot() wrote before masking: a plain dump, the API key and URLs in clear."""
    settings = load_settings(
        None, data_dir=str(data_dir), training={"beta": 0.25},
        database_url=f"postgresql+psycopg://kaizen:{CLEAR['db password']}@db-host:5432/kaizen",
        worker={"broker_url": f"redis://:{CLEAR['broker password']}@redis-host:6379/0"},
        judge={"openai": {"base_url": f"http://judge:{CLEAR['judge url password']}@judge-host:8000/v1"}},
    )
    snapshot = settings.model_dump(mode="json")
    snapshot["serve"]["api_key"] = CLEAR["serve api key"]
    return snapshot


def _old_lineage(url: str, snapshot: dict) -> int:
    """A lineage at revision 0007 with one running iteration: two stages done, the judge failed
    with an error quoting its endpoint, as the openai judge's errors did."""
    command.upgrade(alembic_config(url), "0007")
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        champion = lineage.register_initial_champion(session, path="/m", base_model="tiny", actor="test")
        iteration = Iteration(parent_checkpoint_id=champion.id, status=IterationStatus.running, config_snapshot=snapshot)
        session.add(iteration)
        session.flush()
        iteration_id = iteration.id
    for stage, result in (("generate_prompts", {"generated": 3}), ("respond", {"responses": 12})):
        with transaction(sessions) as session:
            input_hash = stage_input_hash(session, iteration_id, stage)
            session.add(StageRun(iteration_id=iteration_id, stage=stage, status=StageStatus.succeeded, attempts=1, result=result, input_hash=input_hash))
    with transaction(sessions) as session:
        error = f"judge endpoint {snapshot['judge']['openai']['base_url']}/chat/completions unreachable after 4 attempts"
        session.add(StageRun(iteration_id=iteration_id, stage="judge", status=StageStatus.failed, attempts=1, error=error,
                             input_hash=stage_input_hash(session, iteration_id, "judge")))
    engine.dispose()  # the old version's process has exited
    return iteration_id


def test_upgrading_masks_the_secrets_old_versions_recorded_and_keeps_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "lineage.db"
    url = f"sqlite:///{db}"
    clear = _snapshot_as_old_versions_recorded(tmp_path / "data")
    iteration_id = _old_lineage(url, clear)
    assert CLEAR["serve api key"].encode() in db.read_bytes() + _wal(db)  # the premise: it is there in clear

    upgrade_to_head(url)

    contents = db.read_bytes() + _wal(db)
    assert not [what for what, secret in CLEAR.items() if secret.encode() in contents]
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        stored = session.get(Iteration, iteration_id).config_snapshot
        assert stored == redact_snapshot(clear)  # only the secrets changed
        assert stored["serve"]["api_key"] == MASK and stored["training"]["beta"] == 0.25
        assert stored["database_url"] == f"postgresql+psycopg://kaizen:{MASK}@db-host:5432/kaizen"
        assert stored["judge"]["openai"]["base_url"] == f"http://judge:{MASK}@judge-host:8000/v1"
        runs = {run.stage: run for run in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id))}
        # The stored results still match their inputs, so the running iteration can resume.
        assert all(run.input_hash == stage_input_hash(session, iteration_id, stage) for stage, run in runs.items())
        assert f"judge endpoint http://judge:{MASK}@judge-host:8000/v1/chat/completions unreachable" in runs["judge"].error


def test_after_the_upgrade_the_dashboard_serves_no_old_secret(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    iteration_id = _old_lineage(url, _snapshot_as_old_versions_recorded(tmp_path / "data"))
    upgrade_to_head(url)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), database_url=url)
    client = TestClient(create_dashboard_app(settings, make_session_factory(make_engine(url))), base_url="http://127.0.0.1")
    for path in (f"/api/iterations/{iteration_id}", f"/iterations/{iteration_id}"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert MASK in page.text and not [what for what, secret in CLEAR.items() if secret in page.text], path


def test_an_upgrade_leaves_a_masked_snapshot_as_it_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    masked = load_settings(None, data_dir=str(tmp_path / "data"), serve={"api_key": "sk-new"}).snapshot()
    iteration_id = _old_lineage(url, masked)
    with make_session_factory(make_engine(url))() as session:
        hashes = dict(session.execute(select(StageRun.stage, StageRun.input_hash)).all())
    upgrade_to_head(url)
    with make_session_factory(make_engine(url))() as session:
        assert session.get(Iteration, iteration_id).config_snapshot == masked
        assert dict(session.execute(select(StageRun.stage, StageRun.input_hash)).all()) == hashes


def _wal(db: Path) -> bytes:
    wal = db.with_name(db.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""
