import pytest

from policies.constraints import Constraint, check, check_all
from policies.repair import REPAIRABLE_KINDS, repair

ANSWER = "Walking is good for you, and it costs nothing.\nIt clears the head. Try it every morning."

FAILING = [
    Constraint.of("lowercase"),
    Constraint.of("uppercase"),
    Constraint.of("no_commas"),
    Constraint.of("quotation"),
    Constraint.of("title"),
    Constraint.of("json_output"),
    Constraint.of("start_with", phrase="In short"),
    Constraint.of("end_with", phrase="I hope this helps"),
    Constraint.of("postscript", marker="P.P.S."),
    Constraint.of("language_marker", language="English"),
    Constraint.of("repeat_request", request="Why walk every day?"),
    Constraint.of("max_words", n=12),
    Constraint.of("max_sentences", n=2),
    Constraint.of("highlights", n=2),
    Constraint.of("exclude_keywords", keywords=("good", "nothing")),
    Constraint.of("include_keywords", keywords=("important", "walking")),
    Constraint.of("keyword_frequency", keyword="head", n=3),
]
LISTED = "Tips:\n1. Sleep well.\n2) Eat well.\n- Walk, daily.\n\nThat is all."


CASES = [(c, ANSWER) for c in FAILING] + [(Constraint.of("bullet_points", n=2), LISTED)]


@pytest.mark.parametrize(("constraint", "answer"), CASES, ids=lambda c: getattr(c, "kind", ""))
def test_a_failing_answer_is_repaired_to_pass_its_check(constraint, answer):
    assert not check(constraint, answer)
    fixed = repair([constraint], answer)
    assert fixed is not None and check(constraint, fixed)


def test_every_repairable_kind_is_exercised():
    assert {c.kind for c, _ in CASES} == REPAIRABLE_KINDS


def test_repairs_are_minimal_edits_of_the_answer():
    assert repair([Constraint.of("lowercase")], ANSWER) == ANSWER.lower()
    assert repair([Constraint.of("quotation")], ANSWER) == f'"{ANSWER}"'
    assert repair([Constraint.of("start_with", phrase="In short")], ANSWER) == f"In short {ANSWER}"
    assert repair([Constraint.of("repeat_request", request="Why walk?")], ANSWER) == f"Why walk?\n\n{ANSWER}"
    assert repair([Constraint.of("max_sentences", n=2)], ANSWER) == "Walking is good for you, and it costs nothing.\nIt clears the head."
    assert repair([Constraint.of("no_commas")], ANSWER).startswith("Walking is good for you and it costs nothing.")


def test_several_failing_constraints_are_repaired_together_and_verified():
    constraints = [Constraint.of("lowercase"), Constraint.of("end_with", phrase="Good luck"), Constraint.of("quotation")]
    fixed = repair(constraints, ANSWER)
    assert fixed is not None and all(check_all(constraints, fixed))
    assert fixed == f'"{ANSWER} Good luck"'.lower()


def test_no_repair_when_a_failing_kind_has_no_sound_edit():
    assert repair([Constraint.of("lowercase"), Constraint.of("min_words", n=120)], ANSWER) is None
    # No list to turn into bullets, and too short a list for four.
    assert repair([Constraint.of("bullet_points", n=3)], ANSWER) is None
    assert repair([Constraint.of("bullet_points", n=4)], LISTED) is None


def test_a_forbidden_word_is_dropped_or_replaced_and_the_sentence_still_reads():
    answer = "Basically, walking is really good. It is a great thing, and a lot of people do it.\nActually it is easy."
    assert repair([Constraint.of("exclude_keywords", keywords=("really", "basically"))], answer) == (
        "Walking is good. It is a great thing, and a lot of people do it.\nActually it is easy."
    )
    assert repair([Constraint.of("exclude_keywords", keywords=("great", "thing", "actually"))], answer) == (
        "Basically, walking is really good. It is a good point, and a lot of people do it.\nIt is easy."
    )
    # Whole words only: "lots" and "thingy" are other words and stay.
    assert repair([Constraint.of("exclude_keywords", keywords=("lot", "thing"))], "Lots of thingy lot.") == "Lots of thingy large number."


def test_missing_required_words_are_named_in_a_closing_line():
    assert repair([Constraint.of("include_keywords", keywords=("important", "walking"))], ANSWER) == (
        f"{ANSWER}\n\nKey words: important."
    )
    assert repair([Constraint.of("keyword_frequency", keyword="it", n=5)], ANSWER) == f"{ANSWER}\n\nKey words: it, it."


def test_a_list_becomes_exactly_n_star_bullets():
    assert repair([Constraint.of("bullet_points", n=2)], LISTED) == "Tips:\n* Sleep well.\n* Eat well.\n\nThat is all."
    assert repair([Constraint.of("bullet_points", n=3)], LISTED) == "Tips:\n* Sleep well.\n* Eat well.\n* Walk, daily.\n\nThat is all."


def test_keyword_repairs_in_both_directions_never_undo_each_other():
    # Requiring one word and forbidding another: both edits apply, and the checks verify them.
    constraints = [Constraint.of("exclude_keywords", keywords=("good",)), Constraint.of("include_keywords", keywords=("simple",))]
    fixed = repair(constraints, ANSWER)
    assert fixed == "Walking is for you, and it costs nothing.\nIt clears the head. Try it every morning.\n\nKey words: simple."
    # A required word that is also forbidden cannot be repaired.
    assert repair([Constraint.of("exclude_keywords", keywords=("simple",)), Constraint.of("include_keywords", keywords=("simple",))], ANSWER) is None


def test_no_repair_for_a_passing_answer_an_empty_one_or_no_constraints():
    assert repair([Constraint.of("lowercase")], ANSWER.lower()) is None
    assert repair([Constraint.of("lowercase")], "   ") is None
    assert repair([], ANSWER) is None


def test_a_repair_the_checker_rejects_is_not_returned():
    # Marking an English answer as French does not make it French: the language check still fails.
    assert repair([Constraint.of("language_marker", language="French")], ANSWER) is None
    # Words compare case-blind, so a lower-cased start phrase still opens the answer.
    both = [Constraint.of("lowercase"), Constraint.of("start_with", phrase="In short")]
    assert repair(both, ANSWER) == f"in short {ANSWER.lower()}"


def test_cutting_to_a_limit_keeps_the_lines_of_a_list():
    answer = "Bring these:\n* a towel.\n* sun cream.\n* a hat. And water too.\n* a book."
    assert repair([Constraint.of("max_sentences", n=4)], answer) == "Bring these:\n* a towel.\n* sun cream.\n* a hat."
    assert repair([Constraint.of("max_words", n=7)], answer) == "Bring these:\n* a towel.\n* sun cream."


def test_highlights_never_open_a_line_with_a_star_so_they_cannot_pass_for_bullets():
    answer = "Pack light.\n* a towel\nGo early in the day."
    fixed = repair([Constraint.of("highlights", n=2)], answer)
    assert fixed == "Pack *light.*\n* a towel\nGo *early in the day.*"
    assert check(Constraint.of("bullet_points", n=1), fixed)
