"""Verified, anchored and length-controlled pairs, and strategy combinations."""

import pytest

from policies.pairs import (
    PreferencePair,
    ScoredResponse,
    build_anchored_pairs,
    build_ended_pairs,
    build_self_reward_pairs,
    build_verified_pairs,
    length_controlled_best,
    parse_strategy,
    select_pairs,
)


def answer(rid: str, checks: tuple[bool, ...] = (), score: float | None = None, length: int = 10, truncated: bool = False, text: str | None = None):
    return ScoredResponse(rid, text if text is not None else f"text of {rid}", score, length, checks, truncated)


def test_parse_strategy_accepts_single_names_combinations_and_the_both_alias():
    assert parse_strategy("verified") == ("verified",)
    assert parse_strategy("verified+self_reward") == ("verified", "self_reward")
    assert parse_strategy(["anchored", "verified", "anchored"]) == ("anchored", "verified")
    assert parse_strategy("both") == ("self_reward", "rlcd")


def test_parse_strategy_names_the_allowed_values_on_a_typo():
    with pytest.raises(ValueError, match="unknown pair strategy 'verifed'.*'verified'"):
        parse_strategy("verifed+rlcd")


def test_verified_pair_chooses_a_passing_answer_and_rejects_a_failing_one():
    responses = {"p": [answer("a", (True, False)), answer("b", (True, True)), answer("c", (False, False))]}

    assert build_verified_pairs(responses) == [PreferencePair("p", "b", "c", "verified", None)]


def test_verified_pair_needs_both_a_passing_and_a_failing_answer():
    all_pass = {"p": [answer("a", (True,)), answer("b", (True,))]}
    all_fail = {"p": [answer("a", (False,)), answer("b", (False,))]}
    unconstrained = {"p": [answer("a", (), 5.0), answer("b", (), 1.0)]}

    assert build_verified_pairs(all_pass) == build_verified_pairs(all_fail) == build_verified_pairs(unconstrained) == []


def test_verified_pair_never_chooses_a_truncated_answer():
    responses = {"p": [answer("a", (True,), truncated=True), answer("b", (False,))]}

    assert build_verified_pairs(responses) == []


def test_judge_breaks_ties_among_passing_answers_with_length_control():
    # b scores best but c is within epsilon and shorter: c is chosen.
    responses = {"p": [answer("b", (True,), 4.0, 30), answer("c", (True,), 3.8, 12), answer("d", (True,), 2.0, 5), answer("x", (False,), 3.0)]}

    assert build_verified_pairs(responses, epsilon=0.3)[0].chosen_id == "c"
    assert build_verified_pairs(responses, epsilon=0.0)[0].chosen_id == "b"


def test_length_controlled_best_is_the_shortest_within_epsilon_of_the_top():
    group = [answer("long", score=4.5, length=80), answer("mid", score=4.3, length=40), answer("short", score=2.0, length=5)]

    assert length_controlled_best(group, 0.25).response_id == "mid"
    assert length_controlled_best(group, 3.0).response_id == "short"
    assert length_controlled_best([], 0.1) is None


def test_self_reward_with_epsilon_prefers_the_shorter_near_top_answer():
    group = {"p": [answer("long", score=4.5, length=80), answer("mid", score=4.4, length=40), answer("bad", score=1.0, length=40)]}

    assert build_self_reward_pairs(group, min_gap=0.5, epsilon=0.2)[0].chosen_id == "mid"
    assert build_self_reward_pairs(group, min_gap=0.5)[0].chosen_id == "long"


def cut(rid: str, checks: tuple[bool, ...]) -> ScoredResponse:
    """An answer cut at max_new_tokens while pairs.reject_unfinished counts that as failing."""
    return ScoredResponse(rid, f"text of {rid}", None, 128, checks, truncated=True, unfinished_fails=True)


def test_with_reject_unfinished_a_cut_answer_that_passes_its_checks_is_rejected():
    responses = {"p": [cut("long", (True,)), answer("done", (True,))]}

    assert build_verified_pairs(responses) == [PreferencePair("p", "done", "long", "verified", None)]
    # Without the option the same answers separate nothing: both pass, and a cut one is never chosen.
    plain = {"p": [answer("long", (True,), length=128, truncated=True), answer("done", (True,))]}
    assert build_verified_pairs(plain) == []


def test_with_reject_unfinished_a_cut_answer_is_rejected_before_finished_failures_and_never_chosen():
    responses = {"p": [answer("wrong", (False, False)), cut("long", (True, True)), answer("done", (True, True))]}

    # The cut answer satisfies more checks than "wrong" yet is the one rejected; no second pair
    # follows, since the cut answer may not be chosen even though its checks pass.
    assert build_verified_pairs(responses, max_per_prompt=2) == [PreferencePair("p", "done", "long", "verified", None)]


def looping(rid: str, checks: tuple[bool, ...]) -> ScoredResponse:
    """An answer that repeats a line while pairs.reject_loops counts that as failing."""
    return ScoredResponse(rid, "[name]\n[name]\n[name]", None, 20, checks, loops=True)


def test_with_reject_loops_a_looping_answer_that_passes_is_rejected_before_other_failures_and_never_chosen():
    responses = {"p": [answer("wrong", (False, False)), looping("loop", (True, True)), answer("done", (True, True))]}

    assert build_verified_pairs(responses, max_per_prompt=2) == [PreferencePair("p", "done", "loop", "verified", None)]
    # An echo is still the first one rejected, and a loop comes before a cut answer.
    echo = ScoredResponse("echo", "do not use commas", None, 20, (True, True), echoes=True)
    assert build_verified_pairs({"p": [echo, *responses["p"]]})[0].rejected_id == "echo"
    assert build_verified_pairs({"p": [cut("long", (True, True)), *responses["p"]]})[0].rejected_id == "loop"
    # A looping answer alone with passing checks is never chosen.
    assert build_verified_pairs({"p": [looping("loop", (True, True)), answer("wrong", (False, False))]}) == []


def test_rejected_answer_is_the_clearest_failure():
    responses = {"p": [answer("ok", (True, True), length=20), answer("one", (True, False), length=20), answer("none", (False, False), length=20)]}

    assert build_verified_pairs(responses)[0].rejected_id == "none"


def test_anchored_pairs_take_the_rejected_answer_from_the_initial_model():
    current = {"p": [answer("cur-pass", (True,)), answer("cur-fail", (False,))]}
    anchor = {"p": [answer("init-fail", (False,)), answer("init-pass", (True,))]}

    assert build_anchored_pairs(current, anchor, min_gap=0.0) == [PreferencePair("p", "cur-pass", "init-fail", "anchored", None)]


def test_anchored_pairs_without_constraints_use_the_judge_and_the_gap():
    current = {"p": [answer("c1", score=4.0), answer("c2", score=3.0)], "q": [answer("c3", score=2.0)]}
    anchor = {"p": [answer("a1", score=2.5), answer("a2", score=3.5)], "q": [answer("a3", score=1.9)]}

    pairs = build_anchored_pairs(current, anchor, min_gap=0.5)

    assert pairs == [PreferencePair("p", "c1", "a1", "anchored", pytest.approx(1.5))]


def test_select_pairs_combines_strategies_one_pair_per_prompt_plus_rlcd():
    verified = [PreferencePair("p1", "a", "b", "verified", None)]
    self_reward = [PreferencePair("p1", "c", "d", "self_reward", 1.0), PreferencePair("p2", "e", "f", "self_reward", 1.0)]
    rlcd = [PreferencePair("p1", "g", "h", "rlcd", None)]

    pairs = select_pairs("verified+self_reward+rlcd", self_reward, rlcd, verified_pairs=verified)

    assert [(p.prompt_id, p.kind) for p in pairs] == [("p1", "verified"), ("p2", "self_reward"), ("p1", "rlcd")]


def test_several_verified_pairs_per_prompt_use_each_answer_once():
    responses = {"p": [answer("a", (True,), length=5), answer("b", (True,), length=9), answer("x", (False,)), answer("y", (False,)), answer("z", (False,))]}

    pairs = build_verified_pairs(responses, max_per_prompt=3)

    assert [p.chosen_id for p in pairs] == ["a", "b"]
    assert len({p.rejected_id for p in pairs}) == 2


def test_ended_pairs_put_a_looping_or_cut_answer_under_one_that_ended_and_passes_as_much():
    responses = {
        "p": [
            answer("long-pass", (True, False), length=30),
            answer("short-fail", (False, False), length=5),
            answer("cut", (True, False), length=128, truncated=True),
            looping("loop", (False, False)),
        ],
        # Nothing ran on: no pair. Everything ran on: no pair.
        "q": [answer("a", (True,)), answer("b", (False,))],
        "r": [answer("c", (True,), length=128, truncated=True), looping("d", (True,))],
    }

    # The loop is rejected first; the chosen answer ended and passes the most checks, then is the shortest.
    assert build_ended_pairs(responses) == [PreferencePair("p", "long-pass", "loop", "ended", None)]


def test_an_ended_pair_never_chooses_an_echo_or_an_answer_passing_fewer_checks():
    echo = ScoredResponse("echo", "do not use commas", None, 10, (True,), echoes=True)
    assert build_ended_pairs({"p": [echo, answer("cut", (True,), length=128, truncated=True)]}) == []
    assert build_ended_pairs({"p": [answer("ended", (False,)), answer("cut", (True,), length=128, truncated=True)]}) == []


def test_ended_pairs_join_prompts_other_strategies_paired_but_repeat_no_pair():
    verified = [PreferencePair("p", "a", "b", "verified", None)]
    ended = [PreferencePair("p", "a", "c", "ended", None), PreferencePair("q", "d", "e", "ended", None), PreferencePair("p", "a", "b", "ended", None)]

    pairs = select_pairs("verified+ended", [], [], verified_pairs=verified, ended_pairs=ended)

    assert [(p.prompt_id, p.chosen_id, p.rejected_id, p.kind) for p in pairs] == [
        ("p", "a", "b", "verified"), ("p", "a", "c", "ended"), ("q", "d", "e", "ended"),
    ]
