import json
import random

import pytest

from policies.constraints import (
    KINDS,
    Constraint,
    check,
    check_all,
    describe,
    echoes_instructions,
    render_prompt,
    sample_constraints,
)

C = Constraint.of

# (constraint, answer, expected): at least one satisfying and one violating answer per kind,
# written by hand, several with the markdown and whitespace small models produce.
CASES = [
    (C("max_words", n=5), "  The sky is blue.  ", True),
    (C("max_words", n=5), "**Well**, the sky is blue.", True),
    (C("max_words", n=5), "The sky is blue today, mostly.", False),
    (C("min_words", n=4), "It is very sunny.", True),
    (C("min_words", n=4), "Sunny - today!", False),
    (C("max_sentences", n=2), "First one. Second one!", True),
    (C("max_sentences", n=2), "<<Title>>\nFirst one. Second one.", True),
    (C("max_sentences", n=2), "One. Two. Three?", False),
    (C("max_sentences", n=2), "- a point\n- another point\n- a third", False),
    (C("min_sentences", n=3), "One. Two! Three? ", True),
    (C("min_sentences", n=3), "Only one sentence here, though long.", False),
    (C("include_keywords", keywords=("time", "people")), "Most PEOPLE lack time.", True),
    (C("include_keywords", keywords=("time", "people")), "Time flies.", False),
    (C("include_keywords", keywords=("time",)), "Timeless art.", False),
    (C("exclude_keywords", keywords=("very",)), "Every day is good.", True),
    (C("exclude_keywords", keywords=("very",)), "It is **very** good.", False),
    (C("keyword_frequency", keyword="help", n=2), "Help me, help you.", True),
    (C("keyword_frequency", keyword="help", n=2), "Help is helpful.", False),
    (C("lowercase"), "all lowercase here, 42 times.", True),
    (C("lowercase"), "almost all lowercase, but Not quite.", False),
    (C("lowercase"), "1234 !!", False),
    (C("uppercase"), "ALL CAPS, 42 TIMES!", True),
    (C("uppercase"), "ALL CAPS except this one.", False),
    (C("no_commas"), "No commas here. None at all.", True),
    (C("no_commas"), "Well, one comma.", False),
    (C("bullet_points", n=3), "Intro:\n* one\n* two\n- three\n\nDone, **bold** not a bullet.", True),
    (C("bullet_points", n=3), "* one\n* two", False),
    (C("bullet_points", n=2), "*emphasis* line\n---\n* one\n* two\n***", True),
    (C("paragraphs", n=3), "First para.\n***\nSecond para.\n***\nThird para.", True),
    (C("paragraphs", n=2), "First para.\n\nSecond para.\n", True),
    (C("paragraphs", n=3), "First para.\n***\n***\nThird para.", False),
    (C("paragraphs", n=2), "Only one paragraph.", False),
    (C("numbered_sections", n=2), "Section 1\nIntro.\n\n## SECTION 2: more\nEnd.", True),
    (C("numbered_sections", n=3), "Section 1\nIntro.\nSection 2\nEnd.", False),
    (C("numbered_sections", n=2), "Section 2\nfirst\nSection 1\nsecond", False),
    (C("title"), "<<A Short Poem>>\nRoses are red.", True),
    (C("title"), "<< >>\nRoses are red. <no title>", False),
    (C("json_output"), '{"answer": "blue", "reasons": [1, 2]}', True),
    (C("json_output"), '```json\n{"answer": "blue"}\n```', True),
    (C("json_output"), 'Here is JSON: {"answer": "blue"}', False),
    (C("json_output"), '"just a string"', False),
    (C("start_with", phrase="Sure"), "**Sure!** Here you go.", True),
    (C("start_with", phrase="Here is my answer"), "  here is my answer: yes.", True),
    (C("start_with", phrase="Sure"), "Surely not.", False),
    (C("start_with", phrase="Sure"), "Okay, sure.", False),
    (C("end_with", phrase="I hope this helps"), "Drink water. I hope this helps!\n", True),
    (C("end_with", phrase="Is there anything else I can help with?"), "Done. *Is there anything else I can help with?*", True),
    (C("end_with", phrase="I hope this helps"), "I hope this helps. Bye.", False),
    (C("quotation"), '  "The answer is four."  ', True),
    (C("quotation"), "“Curly quotes count too.”", True),
    (C("quotation"), '"Only opened.', False),
    (C("quotation"), '""', False),
    (C("postscript", marker="P.S."), "Main answer.\n\nP.S. Call me.", True),
    (C("postscript", marker="P.S."), "main answer.\n**p.s.** call me.", True),
    (C("postscript", marker="P.S."), "P.S. Nothing before it.", False),
    (C("postscript", marker="P.S."), "Main answer.\nP.P.S. wrong marker.", False),
    (C("postscript", marker="P.P.S."), "Main answer.\nP.P.S. right marker.", True),
    (C("postscript", marker="P.S."), "Main answer.\nP.S.", False),
    (C("placeholders", n=2), "Dear [name], meet me at [place].", True),
    (C("placeholders", n=2), "Dear [name], see [this link](http://x.y).", False),
    (C("placeholders", n=1), "Dear friend, no brackets [ ].", False),
    (C("language_marker", language="English"), "Language: English\nThe cat is on the mat and it is happy.", True),
    (C("language_marker", language="French"), "**Language: French**\nLe chat est dans la maison et il dort.", True),
    (C("language_marker", language="French"), "Language: French\nThe cat is on the mat and it is happy.", False),
    (C("language_marker", language="English"), "The cat is on the mat and it is happy.\nLanguage: English", False),
    (C("repeat_request", request="Name a fruit."), "Name a fruit. An apple.", True),
    (C("repeat_request", request="Name a fruit."), "**Name a fruit:** apple", True),
    (C("repeat_request", request="Name a fruit."), "Name a fruit.", False),
    (C("repeat_request", request="Name a fruit."), "An apple. Name a fruit.", False),
    (C("two_responses"), "Apples are red.\n******\nBananas are yellow.", True),
    (C("two_responses"), "Apples are red.\n******\nApples are red!", False),
    (C("two_responses"), "One.\n******\nTwo.\n******\nThree.", False),
    (C("two_responses"), "One.\n*******\nTwo.", False),
    # A quotation-wrapped answer still has its header, sections and bullets.
    (C("language_marker", language="English"), '"Language: English\nThe cat is on the mat and it is happy."', True),
    (C("numbered_sections", n=2), '"Section 1\nIntro.\nSection 2\nEnd."', True),
    (C("bullet_points", n=2), '"* one\n* two"', True),
    (C("highlights", n=2), "This is *important* and **bold** text.", True),
    (C("highlights", n=2), "* a bullet\n* another bullet with *one* highlight", False),
    (C("highlights", n=1), "Two * three * four", False),
]


@pytest.mark.parametrize(("constraint", "text", "expected"), CASES, ids=[f"{c.kind}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_checker_on_hand_written_answers(constraint, text, expected):
    assert check(constraint, text) is expected


def test_every_kind_has_a_positive_and_a_negative_case():
    positive = {c.kind for c, _, expected in CASES if expected}
    negative = {c.kind for c, _, expected in CASES if not expected}
    assert positive == set(KINDS)
    assert negative == set(KINDS)
    assert len(KINDS) >= 20


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_empty_answer_satisfies_no_constraint(kind):
    rng = random.Random(1)
    params = KINDS[kind].sample(rng)
    if KINDS[kind].needs_task:
        params["request"] = "Say hi."
    constraint = C(kind, **params)
    assert check(constraint, "") is False
    assert check(constraint, "  \n\t ") is False


def test_constraint_is_hashable_and_round_trips_through_json():
    constraint = C("include_keywords", keywords=["time", "people"])
    again = Constraint.from_json(json.loads(json.dumps(constraint.to_json())))

    assert again == constraint
    assert hash(again) == hash(constraint)
    assert constraint.to_json() == {"kind": "include_keywords", "keywords": ["time", "people"]}
    assert constraint.param("keywords") == ("time", "people")


def test_unknown_kind_and_wrong_parameters_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: .*max_words"):
        C("max_wordz", n=3)
    with pytest.raises(ValueError, match=r"takes parameters \['n'\]"):
        C("max_words", limit=3)
    with pytest.raises(ValueError, match="kind"):
        Constraint.from_json({"n": 3})


def test_describe_and_render_prompt():
    constraints = [C("max_words", n=40), C("no_commas")]

    assert describe(constraints[0]) == "Answer in at most 40 words."
    assert render_prompt(" Explain rain. ", constraints) == (
        "Explain rain. Answer in at most 40 words. Do not use any commas."
    )


def test_check_all_reports_each_constraint():
    constraints = [C("max_words", n=3), C("lowercase"), C("no_commas")]

    assert check_all(constraints, "yes, indeed") == [True, True, False]


def test_conflicts_are_symmetric():
    for name, kind in KINDS.items():
        for other in kind.conflicts_with:
            assert name in KINDS[other].conflicts_with, (name, other)


def test_sampled_constraints_are_deterministic_distinct_and_compatible():
    for seed in range(200):
        first = sample_constraints(random.Random(seed), 3)
        assert first == sample_constraints(random.Random(seed), 3)
        kinds = [c.kind for c in first]
        assert len(set(kinds)) == 3
        assert "repeat_request" not in kinds
        for i, a in enumerate(kinds):
            assert not any(b in KINDS[a].conflicts_with for b in kinds[i + 1 :])


def test_sampling_uses_every_kind_and_fills_the_request_from_the_task():
    seen = set()
    for seed in range(400):
        for constraint in sample_constraints(random.Random(seed), 2, task="Name a fruit."):
            seen.add(constraint.kind)
            if constraint.kind == "repeat_request":
                assert constraint.param("request") == "Name a fruit."
    assert seen == set(KINDS)


def test_sampling_restricted_kinds_and_impossible_requests():
    only = sample_constraints(random.Random(0), 1, kinds=["lowercase"])
    assert only == [C("lowercase")]
    with pytest.raises(ValueError, match="compatible"):
        sample_constraints(random.Random(0), 2, kinds=["lowercase", "uppercase"])
    with pytest.raises(ValueError, match="unknown constraint kind"):
        sample_constraints(random.Random(0), 1, kinds=["nope"])


def test_some_kinds_are_satisfied_by_an_ordinary_answer():
    # The contrast a small model's samples need: plain answers pass some constraints by chance.
    answer = "drinking water helps your body stay cool and it is easy to do every day. i hope this helps"
    passes = [C("lowercase"), C("no_commas"), C("max_words", n=20), C("include_keywords", keywords=("easy",)),
              C("end_with", phrase="I hope this helps")]
    assert all(check_all(passes, answer))


def test_an_answer_that_copies_an_instruction_sentence_echoes_it():
    forbid = [Constraint.of("exclude_keywords", keywords=("also", "basically"))]
    # Seen from SmolLM2 after training on repairs that prepend the request.
    assert echoes_instructions(forbid, 'do not use the word "basically"\n\nI hope this helps.')
    assert echoes_instructions([Constraint.of("uppercase")], "Sure! WRITE YOUR WHOLE ANSWER in capitals.")
    assert not echoes_instructions(forbid, "A fridge pumps heat out of the box, so the food stays cold.")
    # Writing what a parameter asks for is following the instruction, not copying it.
    ending = [Constraint.of("end_with", phrase="Let me know if you have any other questions")]
    assert not echoes_instructions(ending, "Keep it cold. Let me know if you have any other questions")
    assert echoes_instructions(ending, "End your answer with the words, as asked.")
    assert not echoes_instructions([], "do not use the word basically")
