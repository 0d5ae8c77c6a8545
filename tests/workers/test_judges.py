"""The judge protocol: registry and config, a stub backend in the judge stage, the verifier,
composition, the frozen judge's cache, and the implicit (DPO) reward on a trained model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.config import ConfigError, load_settings
from daemon.db.engine import transaction
from daemon.db.models import Judgment
from policies import judges
from tests.factories import lineage_with_responses, small_cycle_settings
from workers.judges import Judge, JudgeCapabilityError, JudgePrompt, Score, build_judge, register_judge
from workers.judges import frozen
from workers.judges.registry import judge_names, unregister_judge
from workers.runtime import ModelRuntime
from workers.stages.judge import judge as judge_stage

MAX_WORDS_3 = [{"kind": "max_words", "n": 3}]
LOWERCASE = {"kind": "lowercase"}


def _loader(calls: list[str] | None = None):
    def load(path: str) -> ModelRuntime:
        if calls is not None:
            calls.append(path)
        return ModelRuntime.load(path, device="cpu")

    return load


# --------------------------------------------------------------------------- registry and config


def test_every_backend_is_discovered_and_unknown_names_fail_config_load_listing_them() -> None:
    # The config's list of built-in names and the registered backends agree.
    assert set(judge_names()) == set(judges.BACKENDS)
    with pytest.raises(ConfigError, match=r"judge\.backend: .*unknown judge 'opnai'; allowed values: .*openai.*verifier"):
        load_settings(None, judge={"backend": ["verifier", "opnai"]})
    with pytest.raises(ConfigError, match=r"gate\.judge: .*unknown judge 'gpt'"):
        load_settings(None, gate={"judge": "gpt"})
    assert load_settings(None, judge={"backend": ["verifier", "implicit"]}).judge.backend == ["verifier", "implicit"]


def test_discovering_the_judges_and_loading_config_leave_torch_unloaded() -> None:
    code = (
        "import sys; from daemon.config import load_settings; load_settings(None, judge={'backend': ['verifier', 'openai']}); "
        "from workers.judges.registry import judge_names; judge_names(); assert 'torch' not in sys.modules, 'torch loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_the_api_key_is_named_not_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-value")
    settings = load_settings(None, judge={"backend": "openai", "openai": {"api_key_env": "JUDGE_TEST_KEY"}})
    assert "sk-secret-value" not in str(settings.snapshot())


# --------------------------------------------------------------------------- a stub plugs in


class LengthStub(Judge):
    """Scores an answer by its word count; registered under a name only this test uses."""

    def score(self, items: Sequence[tuple[object, str]]) -> list[Score]:
        return [Score(value=float(len(answer.split())), raw="counted", parse_error=None, judge=self.label_name) for _, answer in items]


def test_a_stub_registered_in_a_test_is_used_by_the_judge_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    register_judge("length_stub")(LengthStub)
    try:
        rows = [("Describe the water cycle.", ["Rain falls.", "Water evaporates and then rains down."])]
        ctx, ids = lineage_with_responses(tmp_path / "data", tiny_model_dir, rows, judge={"backend": "length_stub"})
        output = judge_stage(ctx)
        with transaction(ctx.sessions) as session:
            output.write(session)
        with ctx.sessions() as session:
            judged = {j.response_id: j for j in session.scalars(select(Judgment))}
    finally:
        unregister_judge("length_stub")
    assert output.result["judge"] == "length_stub"
    assert judged[ids["Rain falls."]].score == 2.0 and judged[ids["Water evaporates and then rains down."]].score == 6.0
    assert {j.judge for j in judged.values()} == {"length_stub"}


# --------------------------------------------------------------------------- verifier and composition


def _judge(settings, *backends: str, policy: Path) -> Judge:  # type: ignore[no-untyped-def]
    return build_judge(settings, "train", policy_path=str(policy), load_model=_loader(), backends=list(backends))


def test_the_verifier_scores_the_satisfied_share_and_compares_by_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    verifier = _judge(small_cycle_settings(tmp_path, tiny_model_dir), "verifier", policy=tiny_model_dir)
    prompt = JudgePrompt("Name a colour.", (MAX_WORDS_3[0], LOWERCASE))

    scores = verifier.score([(prompt, "blue."), (prompt, "Blue."), (prompt, "It Is A Deep Blue."), ("Name a colour.", "blue")])
    assert [s.value for s in scores[:3]] == [1.0, 0.5, 0.0]
    assert scores[3].value is None and "no constraints" in scores[3].parse_error

    comparisons = verifier.compare([(prompt, "blue.", "Blue."), (prompt, "It Is Deep Blue.", "Blue."), (prompt, "red", "blue"), ("Name a colour.", "a", "b")])
    assert [(c.preference, c.verdict) for c in comparisons] == [(1.0, "a"), (0.0, "b"), (0.5, "tie"), (None, None)]


def test_composite_verifier_then_self_orders_what_the_checks_cannot_separate(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(tmp_path, tiny_model_dir)
    composite = _judge(settings, "verifier", "self", policy=tiny_model_dir)
    alone = _judge(settings, "self", policy=tiny_model_dir)
    prompt = JudgePrompt("Name a colour.", tuple(MAX_WORDS_3))
    separated = (prompt, "blue", "the colour of the sky on a clear day")
    equal = (prompt, "blue", "red")
    unchecked = ("Name a colour.", "blue", "red")

    decided = composite.compare([separated, equal, unchecked])

    assert composite.label_name == "verifier+self:logprob"
    assert decided[0].raw["decided_by"] == "verifier" and decided[0].preference == 1.0 and len(decided[0].raw["levels"]) == 1
    by_self = alone.compare([equal, unchecked])
    for comparison, reference in zip(decided[1:], by_self, strict=True):
        assert [level["judge"] for level in comparison.raw["levels"]][-1] == "self:logprob"
        assert comparison.preference == pytest.approx(reference.preference)
        assert comparison.verdict == reference.verdict
        assert "position_preference" in comparison.raw["levels"][-1]["raw"]  # the swap-averaged numbers are kept

    answers = ["blue", "red", "green light of a traffic signal", "the colour of the sky"]
    combined = composite.score([(prompt, a) for a in answers])
    self_scores = [s.value for s in alone.score([(prompt, a) for a in answers])]
    satisfied = [1.0, 1.0, 0.0, 0.0]
    expected_order = sorted(range(4), key=lambda i: (satisfied[i], self_scores[i]))
    assert sorted(range(4), key=lambda i: combined[i].value) == expected_order
    # Between two compliant answers the difference is the self-judge's own.
    assert combined[0].value - combined[1].value == pytest.approx(self_scores[0] - self_scores[1])


# --------------------------------------------------------------------------- frozen


def test_the_frozen_judge_loads_its_model_once_per_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(tmp_path, tiny_model_dir)
    calls: list[str] = []
    other_policy = tmp_path / "not-loaded"
    for _ in range(2):
        judge = build_judge(settings, "gate", policy_path=str(other_policy), load_model=_loader(calls), initial_path=str(tiny_model_dir), backends=["frozen"])
        [comparison] = judge.compare([("Name a colour.", "blue", "red")])
        assert comparison.judge == "frozen:logprob" and comparison.verdict in {"a", "b", "tie"}
    assert calls == [str(tiny_model_dir)]  # the initial model, loaded once; never the policy
    assert str(tiny_model_dir) in frozen.pinned_paths()


def test_composite_scores_fall_back_to_the_next_level_where_the_first_cannot_score(tmp_path: Path, tiny_model_dir: Path) -> None:
    register_judge("length_stub")(LengthStub)
    try:
        composite = _judge(small_cycle_settings(tmp_path, tiny_model_dir), "verifier", "length_stub", policy=tiny_model_dir)
        checked = JudgePrompt("Name a colour.", tuple(MAX_WORDS_3))
        scores = composite.score([
            (checked, "the colour of the sky"), (checked, "pale blue"), (checked, "blue"),  # 0, 1, 1 satisfied
            ("Name a colour.", "pale blue"), ("Name a colour.", "the colour of the sky"),  # nothing to check
        ])
    finally:
        unregister_judge("length_stub")
    values = [s.value for s in scores]
    # Checked prompt: compliance first, then length (the stub) among the compliant answers.
    assert values[0] < values[2] < values[1]
    assert values[1] - values[2] == pytest.approx(1.0)  # the stub's own gap (2 words vs 1)
    # Unchecked prompt: the stub's values as they are.
    assert values[3:] == [2.0, 5.0]
    assert all(s.judge == "verifier+length_stub" for s in scores)


def test_a_judge_asked_for_what_it_cannot_do_says_which_setting_to_change(tmp_path: Path, tiny_model_dir: Path) -> None:
    implicit = build_judge(
        small_cycle_settings(tmp_path, tiny_model_dir), "label", policy_path=str(tiny_model_dir), load_model=_loader(), backends=["implicit"]
    )
    with pytest.raises(JudgeCapabilityError, match="judge 'implicit' cannot label attributes; choose another judge.label_backend"):
        implicit.label([("Name a colour.", "blue")], ["helpfulness"])


@pytest.mark.slow
def test_a_cycle_judged_by_verifier_then_self_checks_the_prompts_constraints(tmp_path: Path, tiny_model_dir: Path) -> None:
    from daemon.bootstrap import initialise
    from daemon.cycle import run_cycle
    from daemon.db.models import Prompt, Response
    from daemon.dispatch import EagerDispatcher
    from policies.constraints import Constraint, check_all

    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir, judge={"backend": ["verifier", "self"]}, respond={"num_samples": 4},
        prompts={"constraints_per_prompt": 2, "constraint_kinds": ["lowercase", "no_commas", "min_words", "max_words"]},
    )
    sessions = initialise(settings)
    run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        rows = session.execute(
            select(Judgment.score, Judgment.judge, Response.text, Prompt.id, Prompt.constraints)
            .join(Response, Response.id == Judgment.response_id).join(Prompt, Prompt.id == Response.prompt_id)
        ).all()
    assert rows and {judge for _, judge, *_ in rows} == {"verifier+self:logprob"}
    by_prompt: dict[int, list[tuple[float, float]]] = {}
    for score, _, text, prompt_id, constraints in rows:
        assert constraints, "training prompts carry their constraints"
        satisfied = check_all([Constraint.from_json(c) for c in constraints], text)
        by_prompt.setdefault(prompt_id, []).append((sum(satisfied) / len(satisfied), score))
    separated = 0
    for answers in by_prompt.values():
        for share_a, score_a in answers:
            for share_b, score_b in answers:
                if share_a > share_b:
                    separated += 1
                    assert score_a > score_b  # the checks decide before the self-judge does
    assert separated > 0, "premise: the checks separate some answers (these kinds vary among the tiny model's samples)"
