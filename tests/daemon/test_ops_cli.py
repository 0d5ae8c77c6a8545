"""Operator commands: promote, rollback, pause/resume, show; audited and transactional."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog.testing
from sqlalchemy import func, select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import load_settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.logs import configure_logging
from daemon.db.models import Checkpoint, CheckpointStatus, Event, Iteration, IterationStatus, Judgment, StageRun
from daemon.scheduler import Daemon
from tests.factories import stand_in_checkpoint



def invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args)
    # The CLI pointed structlog at the runner's captured stderr, which is closed now.
    configure_logging()
    return result


class Lineage:
    """A lineage DB in a data dir, built through the real lineage functions."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = f"sqlite:///{data_dir / 'lineage.db'}"
        upgrade_to_head(self.url)
        self.sessions = make_session_factory(make_engine(self.url))
        with transaction(self.sessions) as session:
            lineage.register_initial_champion(session, path=stand_in_checkpoint(data_dir / "models" / "base"), base_model="tiny", actor="kaizen init")

    def candidate(self, checkpoint_id: str, *, gate: str) -> None:
        """A candidate of the current champion, then the gate's verdict on it."""
        with transaction(self.sessions) as session:
            parent = lineage.current_champion(session)
            session.add(Checkpoint(id=checkpoint_id, parent_id=parent.id, base_model="tiny", path=stand_in_checkpoint(self.data_dir / "ckpt" / checkpoint_id), status=CheckpointStatus.candidate, metrics={}))
            session.flush()
            if gate == "promote":
                lineage.promote(session, checkpoint_id, actor="gate", reason="clear win", iteration_id=None)
            else:
                lineage.reject(session, checkpoint_id, actor="gate", reason="no clear win", iteration_id=None)

    def champion(self) -> str:
        with self.sessions() as session:
            return lineage.current_champion(session).id

    def status(self, checkpoint_id: str) -> CheckpointStatus:
        with self.sessions() as session:
            return session.get(Checkpoint, checkpoint_id).status

    def events(self, kind: str) -> list[Event]:
        with self.sessions() as session:
            return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))

    def kaizen(self, *args: str):  # type: ignore[no-untyped-def]
        return invoke([*args, "--data-dir", str(self.data_dir)])


@pytest.fixture()
def db(tmp_path: Path) -> Lineage:
    return Lineage(tmp_path / "data")


@pytest.fixture()
def history(db: Lineage) -> Lineage:
    """ckpt-0000 → 0001 (promoted) → 0002 (rejected) → 0003 (promoted): champion 0003."""
    db.candidate("ckpt-0001", gate="promote")
    db.candidate("ckpt-0002", gate="reject")
    db.candidate("ckpt-0003", gate="promote")
    return db


def test_promote_makes_the_checkpoint_champion_and_records_who_and_why(history: Lineage) -> None:
    result = history.kaizen("promote", "ckpt-0001", "--reason", "better in the A/B test", "--actor", "alice")
    assert result.exit_code == 0, result.output
    assert "promoted ckpt-0001" in result.stdout and "ckpt-0003" in result.stdout
    assert history.champion() == "ckpt-0001"
    assert history.status("ckpt-0001") == CheckpointStatus.champion
    assert history.status("ckpt-0003") == CheckpointStatus.retired
    (event,) = history.events(lineage.MANUAL_PROMOTION_EVENT)
    assert (event.checkpoint_id, event.previous_checkpoint_id, event.actor, event.reason) == ("ckpt-0001", "ckpt-0003", "alice", "better in the A/B test")
    assert event.created_at is not None


def test_promote_defaults_the_actor_to_the_login_name(history: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "carol")
    assert history.kaizen("promote", "ckpt-0001").exit_code == 0
    assert history.events(lineage.MANUAL_PROMOTION_EVENT)[0].actor == "carol"


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [("ckpt-0002", "rejected by the gate"), ("ckpt-9999", "unknown checkpoint"), ("ckpt-0003", "already the champion")],
)
def test_promote_refuses_rejected_unknown_or_current_and_changes_nothing(history: Lineage, checkpoint: str, message: str) -> None:
    result = history.kaizen("promote", checkpoint)
    assert result.exit_code == 1
    assert message in result.stderr
    assert history.champion() == "ckpt-0003"
    assert history.events(lineage.MANUAL_PROMOTION_EVENT) == []


def test_promote_refuses_the_candidate_of_a_running_iteration(history: Lineage) -> None:
    with transaction(history.sessions) as session:
        iteration = Iteration(parent_checkpoint_id="ckpt-0003", status=IterationStatus.running, config_snapshot={})
        session.add(iteration)
        session.flush()
        session.add(Checkpoint(id="ckpt-0004", parent_id="ckpt-0003", base_model="tiny", path="/x", status=CheckpointStatus.candidate, created_iteration_id=iteration.id, metrics={}))
        session.flush()
        iteration.candidate_checkpoint_id = "ckpt-0004"
    result = history.kaizen("promote", "ckpt-0004")
    assert result.exit_code == 1 and "still running" in result.stderr
    assert history.champion() == "ckpt-0003"


def test_rollback_returns_to_the_previous_champion_and_twice_goes_two_steps_back(history: Lineage) -> None:
    first = history.kaizen("rollback", "--reason", "regression in prod", "--actor", "bob")
    assert first.exit_code == 0, first.output
    assert "ckpt-0001" in first.stdout and "was ckpt-0003" in first.stdout
    assert history.champion() == "ckpt-0001"
    assert history.status("ckpt-0003") == CheckpointStatus.retired
    second = history.kaizen("rollback")
    assert second.exit_code == 0, second.output
    assert history.champion() == "ckpt-0000"  # not back to ckpt-0003: rollbacks walk the history backwards
    events = history.events(lineage.ROLLBACK_EVENT)
    assert [(e.checkpoint_id, e.previous_checkpoint_id) for e in events] == [("ckpt-0001", "ckpt-0003"), ("ckpt-0000", "ckpt-0001")]
    assert (events[0].actor, events[0].reason) == ("bob", "regression in prod")
    third = history.kaizen("rollback")
    assert third.exit_code == 1 and "nothing to roll back to" in third.stderr
    assert history.champion() == "ckpt-0000"


def test_rollback_to_an_earlier_champion(history: Lineage) -> None:
    result = history.kaizen("rollback", "--to", "ckpt-0000")
    assert result.exit_code == 0, result.output
    assert history.champion() == "ckpt-0000"
    assert history.status("ckpt-0003") == CheckpointStatus.retired


def test_rollback_to_a_checkpoint_that_was_never_champion_is_refused(history: Lineage) -> None:
    result = history.kaizen("rollback", "--to", "ckpt-0002")
    assert result.exit_code == 1
    assert "was never champion" in result.stderr and "kaizen promote" in result.stderr
    assert history.champion() == "ckpt-0003"


def test_rollback_without_an_earlier_champion_is_refused_with_a_clear_message(db: Lineage) -> None:
    db.candidate("ckpt-0001", gate="reject")
    result = db.kaizen("rollback")
    assert result.exit_code == 1
    assert "nothing to roll back to: ckpt-0000 is the first champion" in result.stderr
    assert db.champion() == "ckpt-0000"
    assert db.events(lineage.ROLLBACK_EVENT) == []


def test_pause_and_resume_change_the_db_print_and_audit(db: Lineage) -> None:
    paused = db.kaizen("pause", "--reason", "investigating judge drift", "--actor", "dana")
    assert paused.exit_code == 0, paused.output
    assert "paused by dana" in paused.stdout
    with db.sessions() as session:
        state = lineage.pause_state(session)
    assert (state.paused, state.changed_by, state.reason) == (True, "dana", "investigating judge drift")
    again = db.kaizen("pause")
    assert again.exit_code == 0 and "already paused" in again.stdout
    assert len(db.events(lineage.PAUSE_EVENT)) == 1  # a no-op is not an event
    resumed = db.kaizen("resume", "--actor", "dana")
    assert resumed.exit_code == 0 and "resumed by dana" in resumed.stdout
    with db.sessions() as session:
        assert lineage.pause_state(session).paused is False
    assert [e.actor for e in db.events(lineage.RESUME_EVENT)] == ["dana"]


class _FirstStageFails:
    """A dispatcher that records the stages it is asked for and fails the first one."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, str]] = []

    def run_stage(self, iteration_id: int, stage: str):  # type: ignore[no-untyped-def]
        self.asked.append((iteration_id, stage))
        raise RuntimeError("stop here")


def test_a_paused_daemon_starts_no_cycle_until_resumed(db: Lineage) -> None:
    settings = load_settings(None, data_dir=str(db.data_dir), worker={"mode": "eager"})
    dispatcher = _FirstStageFails()
    daemon = Daemon(settings, db.sessions, dispatcher, max_cycles=1)
    assert db.kaizen("pause").exit_code == 0
    daemon._tick()
    with db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Iteration)) == 0
    assert dispatcher.asked == []
    assert db.kaizen("resume").exit_code == 0
    daemon._tick()
    assert [stage for _, stage in dispatcher.asked] == ["generate_prompts"]  # a cycle started


class _StagesSucceed:
    """A dispatcher whose stages all succeed at once (nothing computed): the orchestration alone."""

    def run_stage(self, iteration_id: int, stage: str):  # type: ignore[no-untyped-def]
        return {}


def test_the_daemon_logs_a_line_as_each_stage_starts_and_ends(db: Lineage) -> None:
    from daemon.stage_specs import stages_for

    settings = load_settings(None, data_dir=str(db.data_dir), worker={"mode": "eager"})
    with structlog.testing.capture_logs() as events:
        Daemon(settings, db.sessions, _StagesSucceed(), max_cycles=2)._tick()

    stage_lines = [(e["event"], e["stage"]) for e in events if e["event"].startswith("stage.")]
    assert stage_lines == [(kind, stage) for stage in stages_for(settings) for kind in ("stage.started", "stage.finished")]
    assert all(e["cycle"] == "1/2" for e in events if e["event"].startswith("stage."))
    assert all(e["seconds"] >= 0 for e in events if e["event"] == "stage.finished")


def test_a_paused_daemon_does_not_resume_an_interrupted_iteration(db: Lineage) -> None:
    with transaction(db.sessions) as session:
        session.add(Iteration(parent_checkpoint_id="ckpt-0000", status=IterationStatus.running, config_snapshot={}))
    settings = load_settings(None, data_dir=str(db.data_dir), worker={"mode": "eager"})
    dispatcher = _FirstStageFails()
    assert db.kaizen("pause").exit_code == 0
    Daemon(settings, db.sessions, dispatcher)._tick()
    assert dispatcher.asked == []


def test_kaizen_cycle_is_refused_while_paused(db: Lineage) -> None:
    assert db.kaizen("pause", "--reason", "maintenance").exit_code == 0
    result = invoke(["cycle", "--data-dir", str(db.data_dir), "--model", "/models/base"])
    assert result.exit_code == 1
    assert "paused" in result.stderr and "maintenance" in result.stderr and "kaizen resume" in result.stderr
    with db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Iteration)) == 0


def test_the_gate_does_not_undo_a_manual_rollback(history: Lineage) -> None:
    # An iteration trained from ckpt-0003; meanwhile an operator rolls back to ckpt-0001.
    assert history.kaizen("rollback").exit_code == 0
    with transaction(history.sessions) as session:
        assert lineage.gate_promotion_blocker(session, "ckpt-0003") == "the champion changed from ckpt-0003 to ckpt-0001 while this iteration ran"
        assert lineage.gate_promotion_blocker(session, "ckpt-0001") is None


# ---------------------------------------------------------------- show and lineage


@pytest.fixture()
def seeded(tmp_path: Path) -> Path:
    from ops.bench.lineage_seed import seed_lineage

    data = tmp_path / "data"
    url = f"sqlite:///{data / 'lineage.db'}"
    upgrade_to_head(url)
    seed_lineage(make_engine(url), iterations=6, judgments_per_iteration=16, seed=1)
    return data


def test_show_prints_stage_timings_pairs_histogram_and_samples(seeded: Path) -> None:
    result = invoke(["show", "3", "--data-dir", str(seeded)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    sessions = make_session_factory(make_engine(f"sqlite:///{seeded / 'lineage.db'}"))
    with sessions() as session:
        runs = {r.stage: r for r in session.scalars(select(StageRun).where(StageRun.iteration_id == 3))}
    assert f"{runs['judge'].compute_seconds:.2f}" in out and f"{runs['dpo_update'].compute_seconds:.2f}" in out
    assert "judge scores:" in out and "unparseable" in out
    assert "rlcd" in out and "prompt " in out and "[policy]" in out
    as_json = json.loads(invoke(["show", "3", "--json", "--data-dir", str(seeded)]).stdout)
    assert as_json["iteration"] == 3
    assert sum(as_json["score_histogram"].values()) == 16
    assert set(as_json["stages"]) == set(runs)


def _judge_score_lines(out: str) -> dict[str, int]:
    """`kaizen show`'s histogram rows ("  2.40-2.45 ████ 3") as {bin: count}."""
    lines = out.split("judge scores:\n", 1)[1].splitlines()
    rows = {}
    for line in lines:
        parts = line.split()
        if not line.startswith("  ") or len(parts) < 2 or not parts[-1].isdigit():
            break
        rows[parts[0]] = int(parts[-1])
    return rows


def test_show_bins_logprob_scores_over_their_own_range(seeded: Path) -> None:
    # Expected scores of a logprob judge: fractional and all between 2.2 and 2.8.
    sessions = make_session_factory(make_engine(f"sqlite:///{seeded / 'lineage.db'}"))
    with transaction(sessions) as session:
        judgments = list(session.scalars(select(Judgment).where(Judgment.iteration_id == 3).order_by(Judgment.id)))
        for index, judgment in enumerate(judgments):
            judgment.score = 2.2 + 0.6 * index / (len(judgments) - 1)
        judgments[0].score = None

    result = invoke(["show", "3", "--data-dir", str(seeded)])

    assert result.exit_code == 0, result.output
    rows = _judge_score_lines(result.stdout)
    scored = {label: n for label, n in rows.items() if label != "unparseable"}
    assert len([n for n in scored.values() if n > 0]) >= 5, result.stdout
    assert rows["unparseable"] == 1 and sum(scored.values()) == len(judgments) - 1
    lows = [float(label.split("-")[0]) for label in scored]
    assert lows == sorted(lows) and lows[0] <= 2.2 + 1e-9 and float(list(scored)[-1].split("-")[1]) > 2.8 - 1e-9


def test_show_keeps_whole_number_bins_for_text_mode_scores(seeded: Path) -> None:
    sessions = make_session_factory(make_engine(f"sqlite:///{seeded / 'lineage.db'}"))
    with transaction(sessions) as session:
        for index, judgment in enumerate(session.scalars(select(Judgment).where(Judgment.iteration_id == 3).order_by(Judgment.id))):
            judgment.score = float(1 + index % 5)

    rows = _judge_score_lines(invoke(["show", "3", "--data-dir", str(seeded)]).stdout)

    assert list(rows) == ["1", "2", "3", "4", "5", "unparseable"] and sum(rows.values()) == 16


def test_show_of_an_unknown_iteration_says_which_exist(seeded: Path) -> None:
    result = invoke(["show", "99", "--data-dir", str(seeded)])
    assert result.exit_code == 1
    assert "no iteration 99: iterations are numbered 1..6" in result.stderr


def test_lineage_tree_names_each_checkpoints_status_once(history: Lineage) -> None:
    result = history.kaizen("lineage")

    assert result.exit_code == 0, result.output
    nodes = {line.split("ckpt-")[1][:4]: line for line in result.stdout.splitlines() if "ckpt-" in line and "→" not in line and "champion:" not in line}
    assert "★ champion" in nodes["0003"] and nodes["0003"].count("champion") == 1, nodes["0003"]
    assert "retired" in nodes["0001"] and "rejected" in nodes["0002"]
    assert all("champion" not in nodes[c] for c in ("0000", "0001", "0002"))
    assert "champion ★" not in result.stdout


def test_lineage_json_has_win_rates_and_decisions_per_checkpoint(seeded: Path) -> None:
    view = json.loads(invoke(["lineage", "--json", "--data-dir", str(seeded)]).stdout)
    gated = [c for c in view["checkpoints"] if c["iteration"] is not None]
    assert gated and all(c["decision"] in {"promoted", "rejected"} and c["win_rate"] is not None for c in gated)
    assert {c["status"] for c in gated if c["decision"] == "rejected"} == {"rejected"}


def test_the_migration_rebuilds_the_champion_stack_of_an_older_lineage(tmp_path: Path) -> None:
    from alembic import command

    from daemon.db.engine import alembic_config
    from daemon.db.models import ChampionPointer

    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'lineage.db'}"
    command.upgrade(alembic_config(url), "0001")
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        for cid, status in (("ckpt-0000", CheckpointStatus.retired), ("ckpt-0001", CheckpointStatus.champion), ("ckpt-0002", CheckpointStatus.retired)):
            session.add(Checkpoint(id=cid, base_model="tiny", path=stand_in_checkpoint(tmp_path / "ckpt" / cid), status=status, metrics={}))
        session.flush()
        session.add(ChampionPointer(id=lineage.CHAMPION_ROW_ID, checkpoint_id="ckpt-0001"))
        for kind, cid in (("init", "ckpt-0000"), ("promotion", "ckpt-0001"), ("rejection", "ckpt-0000"), ("promotion", "ckpt-0002"), ("rollback", "ckpt-0001")):
            session.add(Event(kind=kind, checkpoint_id=cid, actor="test"))
            session.flush()
    upgrade_to_head(url)
    with sessions() as session:
        assert lineage.champion_history(session) == ["ckpt-0000", "ckpt-0001"]
    result = invoke(["rollback", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    with sessions() as session:
        assert lineage.current_champion(session).id == "ckpt-0000"


def test_status_shows_the_champion_and_whether_the_daemon_is_paused(db: Lineage) -> None:
    before = db.kaizen("status")
    assert before.exit_code == 0, before.output
    assert "champion: ckpt-0000" in before.stdout and "paused" not in before.stdout
    db.kaizen("pause", "--reason", "disk full", "--actor", "dana")
    after = db.kaizen("status")
    assert "paused by dana" in after.stdout and "disk full" in after.stdout
