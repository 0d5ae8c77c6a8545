"""Evaluation suites end to end on the tiny model: `kaizen eval`, cached rows, the jsonl suite,
paired comparisons, the evaluate_suites stage, and the scores in lineage views and the dashboard."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import load_settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Checkpoint, CheckpointStatus, Iteration, IterationStatus, SuiteResult
from daemon.logs import configure_logging
from policies.suites import load_instruct_checks, parse_items, score_item
from workers import evaluation
from workers.generation import Generation
from daemon.stage_runs import StageContext
from workers.stages.evaluate_suites import evaluate_suites

MAX_ITEMS = 4


@dataclass
class Env:
    data_dir: Path
    config: Path
    sessions: object

    def kaizen(self, *args: str):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(app, [*args, "--config", str(self.config)])
        configure_logging()  # the CLI pointed structlog at the runner's closed stderr
        return result

    def rows(self) -> list[SuiteResult]:
        with self.sessions() as session:  # type: ignore[operator]
            return list(session.scalars(select(SuiteResult).order_by(SuiteResult.id)))

    def add_champion(self, checkpoint_id: str, path: Path) -> None:
        with transaction(self.sessions) as session:  # type: ignore[arg-type]
            parent = lineage.current_champion(session)
            session.add(Checkpoint(id=checkpoint_id, parent_id=parent.id, base_model="tiny", path=str(path), status=CheckpointStatus.candidate, metrics={}))
            session.flush()
            lineage.promote(session, checkpoint_id, actor="test", reason="test", iteration_id=None)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return load_settings(self.config)


@pytest.fixture()
def env(tmp_path: Path, tiny_model_dir: Path) -> Env:
    data_dir = tmp_path / "data"
    config = tmp_path / "kaizen.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(data_dir), "model": {"path": str(tiny_model_dir)},
        "eval": {"max_items": MAX_ITEMS, "max_new_tokens": 6, "bootstrap_resamples": 200},
    }))
    url = f"sqlite:///{data_dir / 'lineage.db'}"
    upgrade_to_head(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path=str(tiny_model_dir), base_model="tiny", actor="test")
    return Env(data_dir, config, sessions)


def fake_answers(monkeypatch: pytest.MonkeyPatch, answer_for) -> None:  # type: ignore[no-untyped-def]
    """Replace the model's greedy answers: `answer_for(checkpoint_path, prompt) -> text`."""
    def answers(settings, path, prompts, progress=None):  # type: ignore[no-untyped-def]
        return [Generation(answer_for(path, prompt), 3, True) for prompt in prompts]

    monkeypatch.setattr(evaluation, "greedy_answers", answers)


def test_eval_initial_records_a_row_and_a_second_call_reuses_it(env: Env) -> None:
    first = env.kaizen("eval", "initial", "--suite", "instruct-checks", "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)["results"][0]

    rows = env.rows()
    assert len(rows) == 1
    row = rows[0]
    assert (row.checkpoint_id, row.suite, row.n) == ("ckpt-0000", "instruct-checks", MAX_ITEMS)
    assert report["cached"] is False and report["score"] == row.score and report["n"] == MAX_ITEMS
    suite_items = load_instruct_checks()[:MAX_ITEMS]
    for item, recorded in zip(suite_items, row.items["items"], strict=True):
        # Each recorded result is the checkers' verdict on the recorded (real model) answer.
        assert recorded["id"] == item.id
        rescored = score_item(item, recorded["answer"])
        assert recorded["passed"] == list(rescored.passed) and recorded["score"] == rescored.score
    assert row.score == sum(r["score"] for r in row.items["items"]) / MAX_ITEMS
    assert row.ci_low <= row.score <= row.ci_high

    second = env.kaizen("eval", "initial", "--suite", "instruct-checks", "--json")
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)["results"][0]
    assert again["cached"] is True and again["config_hash"] == report["config_hash"]
    assert [r.id for r in env.rows()] == [row.id]
    assert env.rows()[0].created_at == row.created_at


def test_force_replaces_the_row_and_a_decoding_change_adds_one(env: Env) -> None:
    assert env.kaizen("eval", "initial", "--suite", "instruct-checks").exit_code == 0
    forced = env.kaizen("eval", "initial", "--suite", "instruct-checks", "--force", "--json")
    assert json.loads(forced.stdout)["results"][0]["cached"] is False
    assert len(env.rows()) == 1

    config = yaml.safe_load(env.config.read_text())
    config["eval"]["max_new_tokens"] = 7
    env.config.write_text(yaml.safe_dump(config))
    assert env.kaizen("eval", "initial", "--suite", "instruct-checks").exit_code == 0
    assert len({r.config_hash for r in env.rows()}) == 2


def test_jsonl_suite_scores_constraints_and_references(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = tmp_path / "mine.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [
        {"id": "capital", "prompt": "What is the capital of France?", "reference": "Paris"},
        {"id": "moon", "prompt": "What orbits the Earth?", "reference": "the Moon"},
        {"id": "lower", "prompt": "Say hello.", "constraints": [{"kind": "lowercase"}, {"kind": "max_words", "n": 5}]},
        {"id": "caps", "prompt": "Shout hello.", "constraints": [{"kind": "uppercase"}]},
    ]) + "\n")
    fake_answers(monkeypatch, lambda _path, prompt: {
        "What is the capital of France?": "It is **Paris**.",
        "What orbits the Earth?": "Mars does.",
    }.get(prompt, "hello there"))

    result = env.kaizen("eval", "initial", "--suite", "jsonl", "--file", str(items), "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["results"][0]
    row = env.rows()[0]
    assert {i["id"]: i["score"] for i in row.items["items"]} == {"capital": 1.0, "moon": 0.0, "lower": 1.0, "caps": 0.0}
    assert (report["score"], report["n"]) == (0.5, 4)
    assert report["per_kind"] == {"lowercase": 1.0, "max_words": 1.0, "uppercase": 0.0}
    # Another file is another suite content: a new config hash, not the cached row.
    items.write_text(items.read_text().replace("Paris", "Lyon"))
    env.kaizen("eval", "initial", "--suite", "jsonl", "--file", str(items))
    assert len(env.rows()) == 2


def test_a_bad_jsonl_file_fails_in_one_line_and_records_nothing(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    for args, message in [
        (["--file", str(bad)], "bad.jsonl line 1: give exactly one of"),
        (["--file", str(tmp_path / "missing.jsonl")], "cannot read the jsonl suite file"),
        ([], "the jsonl suite needs a file"),
    ]:
        result = env.kaizen("eval", "initial", "--suite", "jsonl", *args)
        assert result.exit_code == 1
        assert message in result.output and result.output.strip().count("\n") == 0
    assert env.rows() == []
    unknown = env.kaizen("eval", "nope", "--suite", "instruct-checks")
    assert unknown.exit_code == 1 and "unknown checkpoint 'nope'" in unknown.output
    env.add_champion("ckpt-0001", tmp_path / "gone")
    missing = env.kaizen("eval", "ckpt-0001", "--suite", "instruct-checks")
    assert missing.exit_code == 1 and f"cannot load the checkpoint at {tmp_path / 'gone'}: no such directory" in missing.output
    assert env.rows() == []


def test_champion_is_compared_with_initial_by_paired_bootstrap(env: Env, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    env.add_champion("ckpt-0001", trained)
    # The "trained" checkpoint answers every prompt in lowercase and briefly; the initial one shouts.
    fake_answers(monkeypatch, lambda path, _prompt: "sure, it is fine. i hope this helps" if path == str(trained) else "NO.")
    config = yaml.safe_load(env.config.read_text())
    config["eval"]["max_items"] = 40
    env.config.write_text(yaml.safe_dump(config))

    result = env.kaizen("eval", "champion", "--suite", "instruct-checks", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["results"][0]
    against = report["against"]
    assert report["checkpoint"] == "ckpt-0001" and against["checkpoint"] == "ckpt-0000"
    by_checkpoint = {r.checkpoint_id: r for r in env.rows()}
    assert set(by_checkpoint) == {"ckpt-0000", "ckpt-0001"}
    assert against["a_score"] == by_checkpoint["ckpt-0001"].score and against["b_score"] == by_checkpoint["ckpt-0000"].score
    assert against["difference"] == pytest.approx(against["a_score"] - against["b_score"])
    assert against["low"] <= against["difference"] <= against["high"] and against["minimum_detectable"] > 0
    text = env.kaizen("eval", "champion", "--suite", "instruct-checks", "--against", "none")
    assert "vs " not in text.output and "cached" in text.output


def test_lineage_and_dashboard_show_suite_scores(env: Env, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_answers(monkeypatch, lambda path, _prompt: "fine" if path == str(tiny_model_dir) else "fine. i hope this helps")
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    env.add_champion("ckpt-0001", trained)
    for checkpoint in ("initial", "champion"):
        evaluation.evaluate_checkpoint(env.settings, env.sessions, checkpoint, "instruct-checks")

    lineage_json = json.loads(env.kaizen("lineage", "--json").stdout)
    scores = {c["id"]: c["suites"]["instruct-checks"] for c in lineage_json["checkpoints"]}
    rows = {r.checkpoint_id: r for r in env.rows()}
    for checkpoint_id, shown in scores.items():
        assert (shown["score"], shown["ci_low"], shown["ci_high"], shown["n"]) == (
            rows[checkpoint_id].score, rows[checkpoint_id].ci_low, rows[checkpoint_id].ci_high, MAX_ITEMS)
    assert [p["checkpoint"] for p in lineage_json["suite_history"]["instruct-checks"]] == ["ckpt-0000", "ckpt-0001"]
    text = env.kaizen("lineage").output
    assert f"instruct-checks {rows['ckpt-0001'].score:.3f}" in text

    from daemon.dashboard import create_dashboard_app

    html = TestClient(create_dashboard_app(env.settings, env.sessions), base_url="http://127.0.0.1").get("/").text
    assert 'id="chart-suite-0"' in html and "instruct-checks over the champion history" in html
    assert html.count('<line class="whisker s0"') >= 2  # an interval per champion
    assert f"<td>ckpt-0001</td><td>instruct-checks</td><td>{rows['ckpt-0001'].score:.3f}</td>" in html


def _iteration(env: Env, tiny_model_dir: Path, tmp_path: Path, decision: str) -> StageContext:
    trained = tmp_path / f"candidate-{decision}"
    shutil.copytree(tiny_model_dir, trained, dirs_exist_ok=True)
    with transaction(env.sessions) as session:  # type: ignore[arg-type]
        iteration = Iteration(parent_checkpoint_id="ckpt-0000", status=IterationStatus.running, config_snapshot={})
        session.add(iteration)
        session.flush()
        candidate = lineage.candidate_checkpoint_id(iteration.id)
        session.add(Checkpoint(id=candidate, parent_id="ckpt-0000", base_model="tiny", path=str(trained), status=CheckpointStatus.candidate, metrics={}))
        session.flush()
        iteration.candidate_checkpoint_id = candidate
        iteration.decision = decision
        if decision == "promoted":
            lineage.promote(session, candidate, actor="gate", reason="test", iteration_id=iteration.id)
        iteration_id = iteration.id
    return StageContext(env.settings, env.sessions, iteration_id)  # type: ignore[arg-type]


def test_the_stage_evaluates_a_promoted_champion_and_the_initial_model(env: Env, tiny_model_dir: Path, tmp_path: Path) -> None:
    rejected = evaluate_suites(_iteration(env, tiny_model_dir, tmp_path, "rejected"))
    assert rejected.result == {"evaluated": [], "skipped": "no promotion"} and env.rows() == []

    promoted = evaluate_suites(_iteration(env, tiny_model_dir, tmp_path, "promoted"))

    assert [(e["checkpoint"], e["suite"]) for e in promoted.result["evaluated"]] == [
        ("ckpt-0000", "instruct-checks"), ("ckpt-0002", "instruct-checks")]
    assert sorted(r.checkpoint_id for r in env.rows()) == ["ckpt-0000", "ckpt-0002"]
    shown = env.kaizen("show", "2").output
    score = next(r.score for r in env.rows() if r.checkpoint_id == "ckpt-0002")
    assert f"suite scores of ckpt-0002: instruct-checks {score:.3f}" in shown
    assert "suite scores of ckpt-0000: instruct-checks" in shown
    from daemon.dashboard import create_dashboard_app

    page = TestClient(create_dashboard_app(env.settings, env.sessions), base_url="http://127.0.0.1").get("/iterations/2").text
    assert f"<td>ckpt-0002 (candidate)</td><td>instruct-checks</td><td>{score:.3f}</td>" in page


def test_pairwise_vs_initial_records_the_debiased_preferences(env: Env, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    env.add_champion("ckpt-0001", trained)
    fake_answers(monkeypatch, lambda path, prompt: ("good " if path == str(trained) else "bad ") + prompt)

    @dataclass
    class Comparison:
        preference: float | None

    class KeywordJudge:
        def compare(self, items):  # type: ignore[no-untyped-def]
            # Prefers the answer that says "good"; cannot read the first prompt.
            return [Comparison(None if i == 0 else float(a.startswith("good"))) for i, (_p, a, _b) in enumerate(items)]

    monkeypatch.setattr(evaluation, "build_judge", lambda settings, role, **context: KeywordJudge())

    report = json.loads(env.kaizen("eval", "champion", "--suite", "pairwise-vs-initial", "--json").stdout)["results"][0]

    assert (report["score"], report["n"], report["unreadable"]) == (1.0, MAX_ITEMS - 1, 1)
    assert "against" not in report
    row = env.rows()[0]
    assert row.items["items"][0]["score"] is None and row.items["items"][1]["initial_answer"].startswith("bad ")
    assert row.items["config"]["initial"] == "ckpt-0000"
    with env.sessions() as session:  # type: ignore[operator]
        assert session.scalar(select(func.count()).select_from(SuiteResult)) == 1


def test_parse_items_round_trip_used_by_jsonl(tmp_path: Path) -> None:
    # The jsonl suite reads what the instruct-checks file holds too.
    first = load_instruct_checks()[0]
    line = json.dumps({"id": first.id, "prompt": first.prompt, "constraints": [c.to_json() for c in first.constraints]})
    assert parse_items(line, "x.jsonl")[0].constraints == first.constraints


def test_pairwise_vs_initial_with_the_configured_gate_judge(env: Env, tmp_path: Path, tiny_model_dir: Path) -> None:
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    env.add_champion("ckpt-0001", trained)

    row = evaluation.evaluate_checkpoint(env.settings, env.sessions, "champion", "pairwise-vs-initial")

    items = row.items["items"]
    assert len(items) == MAX_ITEMS and row.n + row.items["unreadable"] == MAX_ITEMS
    readable = [i["score"] for i in items if i["score"] is not None]
    assert all(0.0 <= p <= 1.0 for p in readable)
    assert row.score == pytest.approx(sum(readable) / len(readable) if readable else 0.0)
    assert all(i["comparison"]["judge"] for i in items)


def test_count_as_failing_scores_cut_and_looping_answers_zero(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = tmp_path / "mine.jsonl"
    items.write_text("\n".join(json.dumps({"id": name, "prompt": f"Say {name}.", "constraints": [{"kind": "lowercase"}]})
                               for name in ("ended", "cut", "looping")) + "\n")
    answers = {
        "Say ended.": Generation("hello there, friend.", 5, True),
        "Say cut.": Generation("hello there, and then", 6, False),
        # Passes "lowercase" by repeating one line: a loop the checks alone reward.
        "Say looping.": Generation("[name]\n[name]\n[name]\n[name]", 6, True),
    }
    monkeypatch.setattr(evaluation, "greedy_answers", lambda settings, path, prompts, progress=None: [answers[p] for p in prompts])

    def scores(failing: list[str]) -> tuple[dict[str, float], SuiteResult]:
        config = yaml.safe_load(env.config.read_text())
        config["eval"]["count_as_failing"] = failing
        env.config.write_text(yaml.safe_dump(config))
        result = env.kaizen("eval", "initial", "--suite", "jsonl", "--file", str(items), "--json")
        assert result.exit_code == 0, result.output
        row = env.rows()[-1]
        return {item["id"]: item["score"] for item in row.items["items"]}, row

    as_checked, plain = scores([])
    assert as_checked == {"ended": 1.0, "cut": 1.0, "looping": 1.0}
    assert plain.items["looping"] == 1 and [i["loops"] for i in plain.items["items"]] == [False, False, True]
    assert scores(["loops"])[0] == {"ended": 1.0, "cut": 1.0, "looping": 0.0}
    strict, row = scores(["cut", "loops"])
    assert strict == {"ended": 1.0, "cut": 0.0, "looping": 0.0}
    assert row.score == pytest.approx(1 / 3) and row.items["per_kind"] == {"lowercase": 1.0}, "per-kind rates stay the checks' verdicts"
    assert len({r.config_hash for r in env.rows()}) == 3, "each setting is its own cached result"


def test_count_as_failing_rejects_an_unknown_kind(env: Env) -> None:
    config = yaml.safe_load(env.config.read_text())
    config["eval"]["count_as_failing"] = ["short"]
    env.config.write_text(yaml.safe_dump(config))
    result = env.kaizen("eval", "initial", "--suite", "instruct-checks")
    assert result.exit_code != 0 and "count_as_failing" in result.output
