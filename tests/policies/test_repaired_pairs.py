"""`repaired` pairs: a failing answer (rejected) against its verifier-guided repair (chosen)."""

import pytest

from policies.constraints import Constraint
from policies.pairs import ScoredResponse, build_repaired_pairs, build_verified_pairs, repaired_response_id, select_pairs

LOWER = [Constraint.of("lowercase")]


def answer(rid: str, text: str, passes: bool, truncated: bool = False) -> ScoredResponse:
    return ScoredResponse(rid, text, None, len(text.split()), (passes,), truncated)


def test_each_failing_answer_is_paired_with_its_repair_in_sample_order():
    responses = {"p": [answer("a", "Tea Is Good.", False), answer("b", "tea is fine.", True), answer("c", "Hot Tea.", False)]}
    pairs, texts = build_repaired_pairs(responses, {"p": LOWER}, max_per_prompt=4)
    assert [(p.chosen_id, p.rejected_id, p.kind) for p in pairs] == [
        (repaired_response_id("a"), "a", "repaired"), (repaired_response_id("c"), "c", "repaired")
    ]
    assert texts == {repaired_response_id("a"): "tea is good.", repaired_response_id("c"): "hot tea."}


def test_repaired_pairs_respect_max_per_prompt_and_skip_cut_answers():
    responses = {"p": [answer("a", "Cut Off Mid", False, truncated=True), answer("b", "One.", False), answer("c", "Two.", False)]}
    pairs, _ = build_repaired_pairs(responses, {"p": LOWER}, max_per_prompt=1)
    assert [p.rejected_id for p in pairs] == ["b"]
    pairs, _ = build_repaired_pairs(responses, {"p": LOWER}, max_per_prompt=3, chosen_must_finish=False)
    assert [p.rejected_id for p in pairs] == ["a", "b", "c"]
    # Where a cut answer counts as failing (pairs.reject_unfinished) it is not repaired either.
    unfinished = {"p": [ScoredResponse("a", "Cut Off Mid", None, 3, (False,), truncated=True, unfinished_fails=True), *responses["p"][1:]]}
    pairs, _ = build_repaired_pairs(unfinished, {"p": LOWER}, max_per_prompt=3, chosen_must_finish=False)
    assert [p.rejected_id for p in pairs] == ["b", "c"]
    # Nor is an answer that loops where that counts (pairs.reject_loops): its repair would loop too.
    looping = {"p": [ScoredResponse("a", "Tea\nTea\nTea", None, 3, (False,), loops=True), *responses["p"][1:]]}
    pairs, _ = build_repaired_pairs(looping, {"p": LOWER}, max_per_prompt=3)
    assert [p.rejected_id for p in pairs] == ["b", "c"]
    with pytest.raises(ValueError, match="max_per_prompt"):
        build_repaired_pairs(responses, {"p": LOWER}, max_per_prompt=0)


def test_no_repaired_pair_without_constraints_or_without_a_repair():
    plain = {"p": [ScoredResponse("a", "Anything.", 3.0, 1)]}
    assert build_repaired_pairs(plain, {}, 2) == ([], {})
    words = {"p": [answer("a", "Too short.", False)]}
    assert build_repaired_pairs(words, {"p": [Constraint.of("min_words", n=50)]}, 2) == ([], {})


def test_verified_then_repaired_pairs_only_the_prompts_the_checks_could_not_separate():
    responses = {
        "mixed": [answer("a", "Tea Is Good.", False), answer("b", "tea is fine.", True)],
        "all_fail": [answer("c", "Hot Tea.", False), answer("d", "Cold Tea.", False)],
    }
    constraints = {"mixed": LOWER, "all_fail": LOWER}
    verified = build_verified_pairs(responses, max_per_prompt=2)
    repaired, _ = build_repaired_pairs(responses, constraints, max_per_prompt=2)
    selected = select_pairs("verified+repaired", [], [], verified_pairs=verified, repaired_pairs=repaired)
    assert [(p.prompt_id, p.kind) for p in selected] == [("mixed", "verified"), ("all_fail", "repaired"), ("all_fail", "repaired")]
