"""The lineage DB on the real PostgreSQL: migrations, promotions, and broken checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from daemon.bootstrap import initialise
from daemon.cycle import CycleError, run_cycle
from daemon.db import lineage
from daemon.db.engine import alembic_config, make_engine, transaction, upgrade_to_head
from daemon.db.models import (
    Base, Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, IterationStatus, Judgment, Prompt, Response, StageRun,
    StageStatus,
)
from daemon.dispatch import EagerDispatcher
from tests.factories import small_cycle_settings
from workers import artifacts
from workers.checkpoints import CheckpointError
from daemon.stage_runner import execute_stage
from daemon.stage_runs import StageContext
from daemon.stage_specs import stage_function


def test_alembic_migrates_postgres_to_head_without_drift_and_back(pg_url: str) -> None:
    upgrade_to_head(pg_url)
    engine = make_engine(pg_url)
    head = ScriptDirectory.from_config(alembic_config(pg_url)).get_current_head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    assert {"input_hash", "worker_id", "heartbeat_at", "lease_expires_at"} <= {c["name"] for c in inspect(engine).get_columns("stage_runs")}
    command.check(alembic_config(pg_url))  # raises if models and migrations disagree on PostgreSQL
    command.downgrade(alembic_config(pg_url), "base")
    assert "stage_runs" not in inspect(engine).get_table_names()
    upgrade_to_head(pg_url)
    engine.dispose()


def test_promoting_an_unknown_or_rejected_checkpoint_is_refused_on_postgres(pg_url: str, pg_sessions) -> None:  # type: ignore[no-untyped-def]
    upgrade_to_head(pg_url)
    with transaction(pg_sessions) as session:
        lineage.register_initial_champion(session, path="/models/base", base_model="base", actor="test")
        session.add(Checkpoint(id="ckpt-0001", parent_id="ckpt-0000", base_model="base", path="/x", status=CheckpointStatus.candidate, metrics={}))
        session.flush()
        lineage.reject(session, "ckpt-0001", actor="gate", reason="lost", iteration_id=None)

    with pytest.raises(lineage.LineageError, match="unknown checkpoint 'ckpt-9999'"):
        with transaction(pg_sessions) as session:
            lineage.promote(session, "ckpt-9999", actor="test", reason=None)
    with pytest.raises(lineage.LineageError, match="was rejected by the gate"):
        with transaction(pg_sessions) as session:
            lineage.promote(session, "ckpt-0001", actor="test", reason=None)

    with pg_sessions() as session:
        assert lineage.current_champion(session).id == "ckpt-0000"
        assert [e.kind for e in session.scalars(select(Event).order_by(Event.id))] == ["init", "rejection"]


class StopBefore(EagerDispatcher):
    """Runs stages in-process until ``stop``, then fails like a crashed daemon would."""

    def __init__(self, settings, sessions, stop: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, sessions)
        self.stop = stop

    def run_stage(self, iteration_id: int, stage: str):  # type: ignore[no-untyped-def]
        if stage == self.stop:
            raise RuntimeError(f"stopped before {stage}")
        return super().run_stage(iteration_id, stage)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated weights", "missing manifest"])
def test_a_broken_candidate_checkpoint_is_refused_at_load_and_never_promoted(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, damage: str
) -> None:
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, database_url=pg_url)
    sessions = initialise(settings)
    with pytest.raises(CycleError, match="stopped before evaluate_gate"):
        run_cycle(sessions, settings, StopBefore(settings, sessions, stop="evaluate_gate"))
    with sessions() as session:
        iteration = session.scalars(select(Iteration)).one()
        candidate = session.get(Checkpoint, iteration.candidate_checkpoint_id)
    weights = Path(candidate.path) / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "size mismatch for model.safetensors"
    else:
        (Path(candidate.path) / "manifest.json").unlink()
        expected = "missing manifest.json"

    with pytest.raises(CheckpointError, match=expected):
        artifacts.model_path_for_loading(settings, candidate.path)
    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=iteration.id)
    result = execute_stage(ctx, "evaluate_gate", stage_function("evaluate_gate"))

    assert result["decision"] == "rejected" and expected in result["reasons"][0]
    with sessions() as session:
        assert lineage.current_champion(session).id == iteration.parent_checkpoint_id
        assert session.get(Checkpoint, candidate.id).status == CheckpointStatus.rejected
        evaluation = session.scalars(select(Evaluation)).one()
        assert not evaluation.promote and "refused at load" in evaluation.reasons["reasons"][0]
        assert session.scalars(select(StageRun).where(StageRun.stage == "evaluate_gate")).one().status == StageStatus.succeeded
    with pytest.raises(lineage.LineageError, match="rejected"):
        with transaction(sessions) as session:
            lineage.promote(session, candidate.id, actor="operator", reason="try anyway")


def test_model_output_with_nul_characters_is_stored_on_postgres(pg_url: str, pg_sessions) -> None:  # type: ignore[no-untyped-def]
    # A byte-level tokenizer can decode to "\x00"; PostgreSQL text refuses it outright.
    upgrade_to_head(pg_url)
    with transaction(pg_sessions) as session:
        lineage.register_initial_champion(session, path="/models/base", base_model="base", actor="test")
        iteration = Iteration(parent_checkpoint_id="ckpt-0000", status=IterationStatus.running, config_snapshot={})
        session.add(iteration)
        session.flush()
        prompt = Prompt(iteration_id=iteration.id, text="Say something.", role="train", source="seed")
        session.add(prompt)
        session.flush()
        response = Response(iteration_id=iteration.id, prompt_id=prompt.id, kind="policy", text="a\x00b", num_tokens=3)
        session.add(response)
        session.flush()
        session.add(Judgment(iteration_id=iteration.id, response_id=response.id, raw_output="\x00score: 5", score=None, parse_error="no verdict"))

    with pg_sessions() as session:
        assert session.scalars(select(Response.text)).one() == "a\ufffdb"
        assert session.scalars(select(Judgment.raw_output)).one() == "\ufffdscore: 5"


def test_suite_results_are_recorded_replaced_and_read_back_on_postgres(pg_url: str, pg_sessions) -> None:  # type: ignore[no-untyped-def]
    from daemon.db import suite_results
    from daemon.db.models import SuiteResult

    upgrade_to_head(pg_url)
    with transaction(pg_sessions) as session:
        lineage.register_initial_champion(session, path="/models/base", base_model="base", actor="test")
    fields = {"checkpoint_id": "ckpt-0000", "suite": "instruct-checks", "config_hash": "abc", "n": 2, "seconds": 1.0}
    with transaction(pg_sessions) as session:
        suite_results.record_suite_result(session, score=0.5, ci_low=0.1, ci_high=0.9, items={"items": [{"id": "a", "answer": "x\x00y"}]}, **fields)
    with transaction(pg_sessions) as session:  # a forced re-evaluation overwrites the same key
        suite_results.record_suite_result(session, score=1.0, ci_low=0.3, ci_high=1.0, items={"items": [{"id": "a", "answer": "ok"}]}, **fields)

    with pg_sessions() as session:
        rows = list(session.scalars(select(SuiteResult)))
        assert [(r.score, r.items["items"][0]["answer"]) for r in rows] == [(1.0, "ok")]
        assert suite_results.latest_scores(session)["ckpt-0000"]["instruct-checks"]["ci_low"] == 0.3
        assert suite_results.champion_score_history(session) == {
            "instruct-checks": [{"checkpoint": "ckpt-0000", "score": 1.0, "ci_low": 0.3, "ci_high": 1.0}]
        }
