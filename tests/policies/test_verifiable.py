import random

from policies import verifiable
from policies.constraints import Constraint, min_answer_tokens
from policies.self_instruct import load_seed_prompts, ngram_overlap, normalize_prompt
from policies.suites import PACKAGED_SUITES, heldout_suite_tasks, load_packaged
from policies.verifiable import (
    SUITE_OVERLAP_LIMIT,
    attach_constraints,
    constraint_count,
    drop_suite_overlaps,
    load_training_tasks,
    training_rng,
)


def test_training_tasks_and_seed_prompts_never_overlap_suite_tasks():
    suite = heldout_suite_tasks()
    assert {"Describe a farm in the early morning.", "Outline a plan for a rainy Sunday at home."} <= set(suite)
    for pool in (load_training_tasks(), load_seed_prompts()):
        worst = max(ngram_overlap(task, other) for task in pool for other in suite)
        assert worst <= SUITE_OVERLAP_LIMIT
        assert drop_suite_overlaps(pool) == pool


def test_rendered_training_prompts_never_equal_a_suite_prompt():
    suite_prompts = {normalize_prompt(item.prompt) for name in PACKAGED_SUITES for item in load_packaged(name)}
    suite_tasks = {normalize_prompt(t) for t in heldout_suite_tasks()}
    for iteration in range(20):
        rng = training_rng(seed=0, iteration=iteration)
        for task in load_training_tasks() + load_seed_prompts():
            made = attach_constraints(task, rng, rng.choice((1, 2, 3)))
            assert normalize_prompt(made.prompt) not in suite_prompts
            assert normalize_prompt(made.task) not in suite_tasks


def test_attach_constraints_renders_the_task_with_its_constraints():
    made = attach_constraints("Why do cats sleep so much?", random.Random(4), 2)

    assert len(made.constraints) == 2
    assert made.prompt.startswith("Why do cats sleep so much? ")
    assert made == attach_constraints("Why do cats sleep so much?", random.Random(4), 2)
    for constraint in made.constraints:
        if constraint.kind == "repeat_request":
            assert constraint.param("request") == "Why do cats sleep so much?"


def test_iterations_draw_different_constraints():
    draws = {attach_constraints("Why do cats sleep so much?", training_rng(0, i), 2).constraints for i in range(10)}
    assert len(draws) > 5


def test_suite_tasks_and_near_copies_are_dropped():
    suite_task = heldout_suite_tasks()[0]
    near_copy = suite_task.rstrip(".") + " for me."
    tasks = [suite_task, "Why do people yawn?", near_copy]

    assert drop_suite_overlaps(tasks) == ["Why do people yawn?"]


def test_task_of_inverts_attach_constraints_and_bare_titles_become_sentences():
    import random

    from policies.verifiable import as_sentence, attach_constraints, task_of

    prompt = attach_constraints("Morning Bible Study", random.Random(3), 2)

    assert prompt.task == "Morning Bible Study."
    assert prompt.prompt.startswith("Morning Bible Study. ")
    assert task_of(prompt.prompt, prompt.constraints) == "Morning Bible Study."
    assert as_sentence("Why is the sky blue?") == "Why is the sky blue?"
    assert task_of("A task without its constraints.", prompt.constraints) == "A task without its constraints."


def test_a_list_of_constraint_counts_draws_each_prompts_count_from_it():
    rng = random.Random(3)
    counts = [constraint_count(rng, [1, 2]) for _ in range(200)]
    assert set(counts) == {1, 2} and 70 < counts.count(2) < 130
    made = [attach_constraints("Tell me about tea.", rng, constraint_count(rng, [2])) for _ in range(5)]
    assert all(len(vp.constraints) == 2 for vp in made)


def test_a_fixed_constraint_count_draws_nothing_so_its_prompts_stay_as_they_were():
    rng, untouched = random.Random(5), random.Random(5)
    assert constraint_count(rng, 1) == 1
    assert rng.random() == untouched.random()


def test_an_answer_budget_keeps_training_constraints_that_fit_it():
    limit = verifiable.BUDGET_SHARE * 128
    unbounded = [verifiable.attach_constraints("Tell me about tea.", random.Random(seed), 1, ["min_words"]) for seed in range(40)]
    bounded = [verifiable.attach_constraints("Tell me about tea.", random.Random(seed), 1, ["min_words"], answer_budget=128) for seed in range(40)]
    assert {vp.constraints[0].param("n") for vp in unbounded} == {30, 50, 80, 120}
    # 80 words (104 tokens) and 120 words (156) do not fit 96 of 128 tokens; 30 and 50 do.
    assert {vp.constraints[0].param("n") for vp in bounded} == {30, 50}
    assert all(min_answer_tokens(vp.constraints) <= limit for vp in bounded)
    # A draw that fits is kept as it is: the budget changes nothing for a prompt that never needed it.
    fitting = [(a, b) for a, b in zip(unbounded, bounded, strict=True) if min_answer_tokens(a.constraints) <= limit]
    assert fitting and all(a == b for a, b in fitting)


def test_a_budget_nothing_fits_keeps_the_draw_with_the_lowest_floor():
    for seed in range(10):
        first = verifiable.attach_constraints("Tell me about tea.", random.Random(seed), 2, ["min_words", "numbered_sections", "bullet_points"])
        tight = verifiable.attach_constraints(
            "Tell me about tea.", random.Random(seed), 2, ["min_words", "numbered_sections", "bullet_points"], answer_budget=8
        )
        assert min_answer_tokens(tight.constraints) <= min_answer_tokens(first.constraints)
        assert len(tight.constraints) == 2


def test_length_floors_of_constraint_kinds():
    assert min_answer_tokens([Constraint.of("min_words", n=100)]) == 130
    assert min_answer_tokens([Constraint.of("numbered_sections", n=3), Constraint.of("lowercase")]) == 45
    assert min_answer_tokens([Constraint.of("repeat_request", request="Tell me about tea.")]) == 6
    assert min_answer_tokens([]) == 0
