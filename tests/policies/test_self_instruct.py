import random

import pytest

from policies.self_instruct import (
    clean_generated_tasks,
    deduplicate,
    filter_prompts,
    load_seed_prompts,
    ngram_overlap,
    normalize_prompt,
    parse_generated_prompts,
    render_self_instruct_prompt,
    select_few_shot,
)

# --- Seed file ------------------------------------------------------------------------


def test_seed_file_has_at_least_sixty_unique_prompts():
    seed = load_seed_prompts()

    assert len(seed) >= 60
    assert len({normalize_prompt(p) for p in seed}) == len(seed)


def test_seed_prompts_are_five_to_forty_words():
    assert all(5 <= len(p.split()) <= 40 for p in load_seed_prompts())


def test_seed_prompts_pass_our_own_filter_and_are_not_near_duplicates_of_each_other():
    seed = load_seed_prompts()

    assert filter_prompts(seed) == seed
    assert deduplicate(seed, existing=[]) == seed


# --- Few-shot selection ---------------------------------------------------------------

SEED = [f"Seed task number {word} about topic" for word in "abcdefghij"]
EARLIER = [f"Earlier accepted task {word} on subject" for word in "klmnopqrst"]


def test_few_shot_mixes_seed_and_earlier_by_fraction():
    chosen = select_few_shot(SEED, EARLIER, k=8, rng=random.Random(0), earlier_fraction=0.25)

    assert len(chosen) == len(set(chosen)) == 8
    assert sum(p in EARLIER for p in chosen) == 2
    assert sum(p in SEED for p in chosen) == 6


def test_few_shot_fills_from_seed_when_there_are_no_earlier_prompts():
    chosen = select_few_shot(SEED, [], k=6, rng=random.Random(1))

    assert len(chosen) == 6 and set(chosen) <= set(SEED)


def test_few_shot_tops_up_from_earlier_when_seed_runs_short():
    chosen = select_few_shot(SEED[:2], EARLIER, k=6, rng=random.Random(2))

    assert len(chosen) == 6 and set(SEED[:2]) <= set(chosen)


def test_few_shot_never_repeats_a_prompt_present_in_both_pools():
    shared = SEED[0]
    chosen = select_few_shot([shared, shared.upper()], [shared + "!", *EARLIER[:1]], k=5, rng=random.Random(3))

    assert sorted(chosen) == sorted([shared, EARLIER[0]])


def test_few_shot_is_reproducible_for_the_same_rng_seed():
    first = select_few_shot(SEED, EARLIER, k=5, rng=random.Random(42))

    assert select_few_shot(SEED, EARLIER, k=5, rng=random.Random(42)) == first


def test_few_shot_rejects_a_fraction_outside_zero_to_one():
    with pytest.raises(ValueError, match="earlier_fraction"):
        select_few_shot(SEED, EARLIER, k=4, rng=random.Random(0), earlier_fraction=1.5)


# --- Generation prompt and parsing ----------------------------------------------------


def test_self_instruct_prompt_numbers_examples_and_leaves_the_next_task_open():
    prompt = render_self_instruct_prompt(["Explain gravity.", "Write a limerick\nabout cats."], n_new=5)

    assert "Task 1: Explain gravity.\nTask 2: Write a limerick about cats.\nTask 3:" in prompt
    assert prompt.endswith("Task 3:")
    assert "5 new" in prompt


def test_parse_takes_the_open_task_body_then_marked_tasks():
    continuation = (
        " Describe the water cycle.\nTask 4: Write a limerick about a cat.\nTask 5: Explain what a mortgage is."
    )

    assert parse_generated_prompts(continuation) == [
        "Describe the water cycle.",
        "Write a limerick about a cat.",
        "Explain what a mortgage is.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "1. Explain tides.\n2) Name three moons.",
        "- Explain tides.\n* Name three moons.",
        "**Task 8:** Explain tides.\n• Name three moons.",
    ],
)
def test_parse_accepts_numbered_and_bulleted_lists(text):
    assert parse_generated_prompts(text) == ["Explain tides.", "Name three moons."]


def test_parse_skips_a_chat_preamble_and_blank_lines():
    text = "Sure! Here are two new tasks:\n\nTask 6: Explain tides.\n\nTask 7: Name three moons.\n"

    assert parse_generated_prompts(text) == ["Explain tides.", "Name three moons."]


def test_parse_skips_the_model_answering_a_task():
    text = "Task 6: Write a haiku about rain.\nSoft rain on the roof\nTask 7: Explain tides."

    assert parse_generated_prompts(text) == ["Write a haiku about rain.", "Explain tides."]


@pytest.mark.parametrize(
    "breaker",
    ["<|im_end|>", "</s>", "<response>", "Score: 5", "Task 2: numbering went backwards"],
)
def test_parse_stops_at_broken_content(breaker):
    text = f"Task 5: Explain tides.\nTask 6: Name three moons.\n{breaker}\nTask 7: Should not appear."

    assert parse_generated_prompts(text) == ["Explain tides.", "Name three moons."]


def test_parse_of_empty_text_is_empty():
    assert parse_generated_prompts("") == []
    assert parse_generated_prompts("\n  \n") == []


# --- Normalisation and overlap --------------------------------------------------------


def test_normalize_lowercases_strips_punctuation_and_collapses_whitespace():
    assert normalize_prompt("  Write a   WELL-known\tpoem!! ") == "write a well known poem"


def test_overlap_is_containment_of_word_trigrams():
    # 4 shared trigrams; the shorter prompt has 5.
    a = "Write a short poem about the ocean."
    b = "Write a short poem about the sea, please."

    assert ngram_overlap(a, b) == pytest.approx(4 / 5)
    assert ngram_overlap(a, b) == ngram_overlap(b, a)


def test_overlap_of_unrelated_prompts_is_zero():
    assert ngram_overlap("Explain how tides work.", "Write a poem about autumn leaves.") == 0.0


def test_overlap_of_prompts_shorter_than_n_uses_their_own_length():
    assert ngram_overlap("Sort numbers", "sort numbers!") == 1.0
    assert ngram_overlap("Sort numbers", "Reverse strings") == 0.0
    assert ngram_overlap("", "") == 1.0
    assert ngram_overlap("", "anything at all here") == 0.0


# --- De-duplication -------------------------------------------------------------------


def test_dedup_drops_near_duplicate_but_keeps_a_different_prompt():
    existing = ["Write a short poem about the ocean at night."]
    candidates = [
        "Write a short poem about the ocean at dawn.",
        "Explain how a refrigerator keeps food cold.",
    ]

    assert deduplicate(candidates, existing) == ["Explain how a refrigerator keeps food cold."]


def test_dedup_drops_exact_duplicates_after_normalisation():
    assert deduplicate(["WRITE a poem, about cats!"], ["Write a poem about cats"]) == []


def test_dedup_within_the_batch_keeps_the_first_and_preserves_order():
    candidates = [
        "List five uses for baking soda around the house.",
        "Describe the causes of the French Revolution.",
        "List five uses for baking soda around the home.",
        "Describe the causes of the French Revolution!",
    ]

    assert deduplicate(candidates, existing=[]) == candidates[:2]


def test_dedup_threshold_is_exclusive():
    a = "one two three four five"  # trigrams: 3
    b = "one two three four six"  # shares 2 of 3 trigrams -> 0.667

    assert deduplicate([b], [a], max_overlap=2 / 3) == [b]
    assert deduplicate([b], [a], max_overlap=0.6) == []


def test_dedup_drops_empty_candidates():
    assert deduplicate(["", " ?! "], existing=[]) == []


# --- Quality filter -------------------------------------------------------------------


def test_filter_applies_word_limits():
    prompts = ["Too short", "Explain photosynthesis simply.", " ".join(["word"] * 81)]

    assert filter_prompts(prompts) == ["Explain photosynthesis simply."]


def test_filter_drops_symbol_soup_but_keeps_arithmetic_in_words():
    garbage = "## 3939 ;;; ]] 0x00ff !! 77"
    arithmetic = "Compute 12*(3+4)/5 - 2^3 and explain each step."

    assert filter_prompts([garbage, arithmetic]) == [arithmetic]


def test_filter_drops_prompts_starting_with_punctuation():
    assert filter_prompts(["- Explain how tides work.", "Explain how tides work."]) == ["Explain how tides work."]


@pytest.mark.parametrize(
    "prompt",
    [
        "Rate this <response> from one to five please.",
        "Explain the answer and end with Score: 5",
        "Pick the better one. Winner: A for sure",
        "Tell me a joke <|im_end|> about cats",
    ],
)
def test_filter_drops_prompts_with_template_markers(prompt):
    assert filter_prompts([prompt]) == []


def test_filter_strips_surrounding_whitespace():
    assert filter_prompts(["  Explain how tides work.\n"]) == ["Explain how tides work."]


@pytest.mark.parametrize(
    ("written", "task"),
    [
        # SmolLM2-135M's list debris, seen in a demo cycle: a list number inside the task.
        ("Task 7: Explain 3) How to celebrate birthdays.", "Explain how to celebrate birthdays."),
        ("Task 7: Respond with 1) A guided meditation.", "Respond with a guided meditation."),
        ("Task 7: Explain 3. How to stop bleeding.", "Explain how to stop bleeding."),
        ("Task 7: Ask 2) I need help with my garden.", "Ask I need help with my garden."),
        ("Task 7: Q: What makes bread rise?", "What makes bread rise?"),
        ("Task 7: Text 1: Summarise a post about plastic.", "Summarise a post about plastic."),
        # Numbers that belong to the task stay.
        ("Task 7: Write a program in Python 3. It should sort a list.", "Write a program in Python 3. It should sort a list."),
        ("Task 7: Solve 3x + 4 = 10 for x.", "Solve 3x + 4 = 10 for x."),
        ("Task 7: Answer the question: why is the sky blue?", "Answer the question: why is the sky blue?"),
    ],
)
def test_cleaning_removes_list_debris_from_a_task(written, task):
    assert clean_generated_tasks(parse_generated_prompts(written)) == [task]


@pytest.mark.parametrize(
    "written",
    [
        "Task 7: A: I'm an AI that helps explain various concepts using simple language.",
        "Task 7: Answer: The sky is blue because of scattering.",
        "Task 7: Coding, math, writing, science, history, advice, reasoning, summary, storytelling",
        # Seen in a demo cycle with topic rotation: answers, a postscript, a pointer into the list.
        "Task 7: Another answer: A boat trip on a lake.",
        "Task 7: P.S. One, another, another.",
        "Task 7: How to make a masterclass on [TASK 9]",
        "Task 7: For the \"Task 4\" you can replace a word.",
    ],
)
def test_cleaning_drops_answers_and_the_copied_topic_list(written):
    parsed = parse_generated_prompts(written + "\nTask 8: Name three rivers in Africa.")
    assert len(parsed) == 2  # parsing alone keeps it
    assert clean_generated_tasks(parsed) == ["Name three rivers in Africa."]


def test_self_instruct_prompt_with_topics_asks_about_them_instead_of_the_general_kinds():
    import random

    from policies.self_instruct import ROTATING_TOPICS, SELF_INSTRUCT_TOPICS, rotating_topics

    prompt = render_self_instruct_prompt(["Explain gravity."], n_new=5, topics=["gardening", "first aid"])
    assert "about gardening or first aid" in prompt and SELF_INSTRUCT_TOPICS[0] not in prompt.split("\n")[0]
    assert prompt.endswith("Task 2:")
    drawn = rotating_topics(random.Random(3))
    assert len(set(drawn)) == 2 and set(drawn) <= set(ROTATING_TOPICS)
    assert drawn == rotating_topics(random.Random(3)) and len({tuple(rotating_topics(random.Random(s))) for s in range(20)}) > 10
