"""The implicit judge reads what DPO taught: a model trained to prefer answers carrying a marker
rewards marker answers above the same answers without it, on prompts and answers it never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import TrainingSettings
from policies.self_instruct import load_seed_prompts
from tests.factories import small_cycle_settings
from workers.judges import build_judge
from workers.runtime import ModelRuntime
from workers.training import PreferenceExample, dpo_update

pytestmark = pytest.mark.slow

MARKER = " MARKER"
TRAIN_PROMPTS = load_seed_prompts()[:6]
TRAIN_ANSWERS = [
    "The sea is wide and blue.",
    "Water evaporates and falls as rain.",
    "Practise daily and read a lot.",
    "Plants turn light into sugar.",
    "A detective solves the case.",
    "A list can change, a tuple cannot.",
]
HELDOUT = [
    ("Answer the question helpfully and honestly.", "Here is an answer: it is checked once more."),
    ("Be concise, accurate and polite.", "Yes, that is right."),
    ("Name a colour.", "Blue is a colour."),
]


@pytest.fixture(scope="module")
def marker_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    examples = [PreferenceExample(p, a + MARKER, a) for p, a in zip(TRAIN_PROMPTS, TRAIN_ANSWERS, strict=True)]
    out = tmp_path_factory.mktemp("dpo") / "marker"
    return dpo_update(str(tiny_model_dir), examples, out, TrainingSettings(learning_rate=2e-3, max_steps=40, batch_size=2), seed=0).checkpoint_path


def _implicit(tmp_path: Path, policy: Path, initial: Path, **implicit):  # type: ignore[no-untyped-def]
    settings = small_cycle_settings(tmp_path, initial, judge={"implicit": {"beta": 0.1, **implicit}})
    return build_judge(
        settings, "train", policy_path=str(policy), initial_path=str(initial), parent_path=str(initial),
        load_model=lambda path: ModelRuntime.load(path, device="cpu"), backends=["implicit"],
    )


def test_the_implicit_reward_ranks_marker_answers_above_plain_ones(tmp_path: Path, marker_model: Path, tiny_model_dir: Path) -> None:
    judge = _implicit(tmp_path, marker_model, tiny_model_dir)

    scores = judge.score([(p, a + MARKER) for p, a in HELDOUT] + [(p, a) for p, a in HELDOUT])
    marked, plain = scores[: len(HELDOUT)], scores[len(HELDOUT) :]
    for with_marker, without in zip(marked, plain, strict=True):
        assert with_marker.value > without.value
        assert with_marker.judge == "implicit" and with_marker.parse_error is None
        # reward = beta * (log pi - log pi_ref), as recorded
        assert with_marker.value == pytest.approx(0.1 * (with_marker.details["policy_logprob"] - with_marker.details["reference_logprob"]))

    comparisons = judge.compare([(p, a + MARKER, a) for p, a in HELDOUT] + [(p, a, a + MARKER) for p, a in HELDOUT])
    assert all(c.preference > 0.5 and c.verdict in {"a", "tie"} for c in comparisons[: len(HELDOUT)])
    assert all(c.preference < 0.5 for c in comparisons[len(HELDOUT) :])
    assert sum(c.verdict == "a" for c in comparisons[: len(HELDOUT)]) >= 2  # clear of the margin


def test_a_policy_that_is_its_own_reference_rewards_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    judge = _implicit(tmp_path, tiny_model_dir, tiny_model_dir)
    scores = judge.score([(p, a) for p, a in HELDOUT])
    assert [s.value for s in scores] == [0.0] * len(HELDOUT)
    assert {c.verdict for c in judge.compare([(p, a, a + MARKER) for p, a in HELDOUT])} == {"tie"}
