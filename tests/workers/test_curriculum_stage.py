"""generate_prompts draws the next cycle's constraint kinds by learnability: kinds whose earlier
training samples disagreed (verified pairs possible) come up more often than kinds always or
never satisfied. Real stage, tiny model, real lineage DB."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from daemon.db.engine import transaction
from daemon.db.lineage import INITIAL_CHECKPOINT_ID
from daemon.db.models import Iteration, IterationStatus, Prompt
from daemon.stage_runs import StageContext
from tests.factories import lineage_with_responses
from workers.stages.generate_prompts import generate_prompts

KINDS = ["lowercase", "uppercase", "no_commas"]
LOWER, UPPER, NO_COMMAS = ({"kind": "lowercase"},), ({"kind": "uppercase"},), ({"kind": "no_commas"},)
# lowercase: half the samples pass; uppercase: none does; no_commas: every one does.
HISTORY = [
    (f"Why is the sky blue, version {i}?", ["all lower here", "Not Lower", "still lower", "Capital A"], list(LOWER))
    for i in range(5)
] + [(f"Tell me about cats {i}.", ["nope", "no way", "Never", "not upper"], list(UPPER)) for i in range(5)] + [
    (f"How do birds fly {i}?", ["fine", "also fine", "ok then", "sure"], list(NO_COMMAS)) for i in range(5)
]


def _next_cycle_prompts(tmp_path, tiny_model_dir, **prompt_settings):
    """generate_prompts run for the iteration after HISTORY's; its output and stored training prompts' constraints."""
    output, stored = _next_cycle(tmp_path, tiny_model_dir, **prompt_settings)
    return output, [constraints for _, _, constraints in stored]


def _next_cycle(tmp_path, tiny_model_dir, **prompt_settings):
    """generate_prompts run for the iteration after HISTORY's; its output and stored training
    prompts as (text, source, constraints)."""
    overrides = {"prompts": {"per_cycle": 60, "max_rounds": 1, "constraint_kinds": KINDS, "top_up_from": "tasks", **prompt_settings}}
    ctx, _ = lineage_with_responses(tmp_path / "data", tiny_model_dir, HISTORY, **overrides)
    with transaction(ctx.sessions) as session:
        session.get(Iteration, ctx.iteration_id).status = IterationStatus.completed
        following = Iteration(parent_checkpoint_id=INITIAL_CHECKPOINT_ID, status=IterationStatus.running, config_snapshot={})
        session.add(following)
        session.flush()
        next_ctx = StageContext(settings=ctx.settings, sessions=ctx.sessions, iteration_id=following.id)

    output = generate_prompts(next_ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        stored = session.scalars(select(Prompt).where(Prompt.iteration_id == next_ctx.iteration_id, Prompt.role == "train")).all()
        return output, [(p.text, p.source, p.constraints) for p in stored]


def test_kinds_whose_samples_disagreed_are_drawn_most(tmp_path, tiny_model_dir):
    output, constraints = _next_cycle_prompts(tmp_path, tiny_model_dir)
    drawn = Counter(c["kind"] for cs in constraints for c in cs)

    weights = output.result["kind_weights"]
    assert set(weights) == set(KINDS)
    assert weights["lowercase"] > weights["no_commas"] and weights["lowercase"] > weights["uppercase"]
    assert drawn["lowercase"] > drawn["no_commas"] and drawn["lowercase"] > drawn["uppercase"], drawn
    assert sum(drawn.values()) == output.result["constrained"]


def test_a_list_of_counts_gives_prompts_with_one_or_two_compatible_constraints(tmp_path, tiny_model_dir):
    output, constraints = _next_cycle_prompts(tmp_path, tiny_model_dir, constraints_per_prompt=[1, 2])
    sizes = Counter(len(cs) for cs in constraints)
    assert set(sizes) == {1, 2} and sum(sizes.values()) == 60, sizes
    # Two constraints on one prompt never conflict: lowercase and uppercase are never drawn together.
    assert all({c["kind"] for c in cs} != {"lowercase", "uppercase"} for cs in constraints if len(cs) == 2)
    assert any(len({c["kind"] for c in cs}) == 2 for cs in constraints)


def test_with_fit_answer_budget_training_constraints_fit_generation_max_new_tokens(tmp_path, tiny_model_dir):
    # generation.max_new_tokens is 48 by default: "at least 80 / 120 words" (104 / 156 tokens) cannot fit.
    _, unbounded = _next_cycle_prompts(tmp_path / "plain", tiny_model_dir, constraint_kinds=["min_words"])
    _, bounded = _next_cycle_prompts(tmp_path / "fit", tiny_model_dir, constraint_kinds=["min_words"], fit_answer_budget=True)
    assert {c["n"] for cs in unbounded for c in cs} == {30, 50, 80, 120}
    sizes = Counter(c["n"] for cs in bounded for c in cs)
    assert set(sizes) <= {30, 50} and sizes[30] > sizes[50], sizes


def test_with_clean_generated_tasks_the_stage_trains_on_cleaned_self_written_tasks(tmp_path, tiny_model_dir, monkeypatch):
    """The model's continuation is fixed here (the tiny model writes no tasks): what the stage
    keeps of it, without and with the option."""
    from workers.generation import Generation
    from workers.stages import generate_prompts as stage

    written = "Explain 3) How to polish old brass doorknobs.\nTask 8: A: I'm an AI that helps explain things.\nTask 9: Name three rivers in Africa."
    monkeypatch.setattr(stage, "sample", lambda ctx, runtime, texts, n, seed: [[Generation(written, 20, True)] * n])

    def tasks(name, **options):
        output, stored = _next_cycle(tmp_path / name, tiny_model_dir, per_cycle=3, constraint_kinds=["lowercase"], **options)
        suffix = " Write your whole answer in lowercase letters, with no capital letters."
        texts = [text.removesuffix(suffix) for text, source, _ in stored if source == "generated"]
        assert output.result["generated"] == len(texts)
        return texts

    assert tasks("plain") == ["Explain 3) How to polish old brass doorknobs.", "A: I'm an AI that helps explain things.", "Name three rivers in Africa."]
    assert tasks("clean", clean_generated_tasks=True) == ["Explain how to polish old brass doorknobs.", "Name three rivers in Africa."]


def test_with_topic_rotation_each_round_asks_for_two_other_subjects(tmp_path, tiny_model_dir, monkeypatch):
    import re

    from policies.self_instruct import ROTATING_TOPICS
    from workers.generation import Generation
    from workers.stages import generate_prompts as stage

    requests: list[str] = []

    def recording(ctx, runtime, texts, n, seed):  # type: ignore[no-untyped-def]
        requests.extend(texts)
        return [[Generation("", 1, True)] * n for _ in texts]  # no task written: every round runs

    def subjects() -> list[str | None]:
        found = [re.search(r"Vary the topic about (.+?) or (.+?) and the kind", request) for request in requests]
        return [match and (match[1], match[2]) for match in found]

    monkeypatch.setattr(stage, "sample", recording)
    _next_cycle(tmp_path / "plain", tiny_model_dir, per_cycle=3, max_rounds=3)
    assert len(requests) == 3 and subjects() == [None, None, None], "the general kinds, every round, without the option"

    requests.clear()
    _next_cycle(tmp_path / "rotated", tiny_model_dir, per_cycle=3, max_rounds=3, topic_rotation=True)
    named = subjects()
    assert len(named) == 3 and all(pair and set(pair) <= set(ROTATING_TOPICS) for pair in named)
    assert len(set(named)) == 3, "each round names other subjects"
