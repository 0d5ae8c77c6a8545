import pytest

from policies.pairs import (
    PAIR_STRATEGIES,
    PreferencePair,
    RlcdSample,
    ScoredResponse,
    build_rlcd_pairs,
    build_self_reward_pairs,
    cap_length_ratio,
    length_normalised,
    length_score_slope,
    select_pairs,
)


def scored(response_id: str, score: float | None, text: str | None = None, length: int = 0) -> ScoredResponse:
    return ScoredResponse(response_id, text if text is not None else f"answer {response_id}", score, length)


# --- Self-reward pairs ----------------------------------------------------------------


def test_self_reward_pair_takes_highest_as_chosen_and_lowest_as_rejected():
    pairs = build_self_reward_pairs({"p1": [scored("r1", 3.0), scored("r2", 4.5), scored("r3", 1.5)]}, min_gap=0.5)

    assert pairs == [PreferencePair("p1", "r2", "r3", "self_reward", 3.0)]


def test_self_reward_drops_prompts_whose_scores_tie():
    assert build_self_reward_pairs({"p1": [scored("r1", 4.0), scored("r2", 4.0)]}, min_gap=0.0) == []


def test_self_reward_drops_prompts_below_the_minimum_gap():
    responses = {"p1": [scored("r1", 4.0), scored("r2", 3.5)], "p2": [scored("r3", 5.0), scored("r4", 3.0)]}

    assert [p.prompt_id for p in build_self_reward_pairs(responses, min_gap=1.0)] == ["p2"]


def test_self_reward_keeps_a_gap_exactly_at_the_minimum():
    assert len(build_self_reward_pairs({"p1": [scored("r1", 4.0), scored("r2", 3.0)]}, min_gap=1.0)) == 1


def test_self_reward_ignores_unscored_responses():
    responses = {"p1": [scored("r1", None), scored("r2", 2.0), scored("r3", None), scored("r4", 4.0)]}

    assert build_self_reward_pairs(responses, min_gap=0.5) == [PreferencePair("p1", "r4", "r2", "self_reward", 2.0)]


def test_self_reward_needs_two_scored_responses():
    responses = {"p1": [scored("r1", 5.0), scored("r2", None)], "p2": []}

    assert build_self_reward_pairs(responses, min_gap=0.0) == []


def test_self_reward_breaks_ties_by_smallest_response_id():
    responses = {"p1": [scored("r9", 5.0), scored("r2", 5.0), scored("r7", 1.0), scored("r3", 1.0)]}

    [pair] = build_self_reward_pairs(responses, min_gap=1.0)

    assert (pair.chosen_id, pair.rejected_id) == ("r2", "r3")


def test_self_reward_skips_identical_best_and_worst_text():
    responses = {"p1": [scored("r1", 5.0, "Paris."), scored("r2", 2.0, " Paris.\n")]}

    assert build_self_reward_pairs(responses, min_gap=1.0) == []


def test_self_reward_keeps_prompt_order():
    responses = {pid: [scored(f"{pid}a", 5.0), scored(f"{pid}b", 1.0)] for pid in ("z", "a", "m")}

    assert [p.prompt_id for p in build_self_reward_pairs(responses, min_gap=1.0)] == ["z", "a", "m"]


def test_self_reward_rejects_a_negative_gap():
    with pytest.raises(ValueError, match="min_gap"):
        build_self_reward_pairs({}, min_gap=-1.0)


# --- RLCD pairs -----------------------------------------------------------------------


def test_rlcd_pair_chooses_positive_over_negative():
    sample = RlcdSample("p1", "pos", "A careful answer.", "neg", "Whatever.")

    assert build_rlcd_pairs([sample]) == [PreferencePair("p1", "pos", "neg", "rlcd", None)]


@pytest.mark.parametrize(
    "sample",
    [
        RlcdSample("p1", None, None, "neg", "Whatever."),
        RlcdSample("p1", "pos", "A careful answer.", None, None),
        RlcdSample("p1", "pos", "", "neg", "Whatever."),
        RlcdSample("p1", "pos", "Same answer.", "neg", "Same answer. "),
    ],
)
def test_rlcd_skips_missing_or_identical_sides(sample):
    assert build_rlcd_pairs([sample]) == []


# --- Strategy -------------------------------------------------------------------------

SELF_REWARD = [PreferencePair("p1", "a", "b", "self_reward", 2.0)]
RLCD = [PreferencePair("p2", "c", "d", "rlcd", None)]


def test_strategies_select_their_pairs():
    assert PAIR_STRATEGIES == ("verified", "repaired", "anchored", "ended", "self_reward", "rlcd", "both")
    assert select_pairs("self_reward", SELF_REWARD, RLCD) == SELF_REWARD
    assert select_pairs("rlcd", SELF_REWARD, RLCD) == RLCD
    assert select_pairs("both", SELF_REWARD, RLCD) == SELF_REWARD + RLCD


def test_unknown_strategy_names_the_allowed_values():
    with pytest.raises(ValueError, match="'self_reward', 'rlcd', 'both'"):
        select_pairs("random", SELF_REWARD, RLCD)


# --- Length cap -----------------------------------------------------------------------


def test_length_cap_drops_exactly_the_pairs_whose_chosen_is_too_much_longer():
    lengths = {"c1": 30, "r1": 10, "c2": 20, "r2": 10, "c3": 10, "r3": 40, "c4": 5, "r4": 0, "c5": 0, "r5": 0}
    pairs = [PreferencePair(f"p{i}", f"c{i}", f"r{i}", "rlcd", None) for i in range(1, 6)]

    kept, dropped = cap_length_ratio(pairs, lengths, max_ratio=2.0)

    # p1: 3x longer, dropped; p2: exactly 2x, kept; p3: chosen shorter, kept;
    # p4: something against nothing, dropped; p5: both empty, kept.
    assert [p.prompt_id for p in dropped] == ["p1", "p4"]
    assert [p.prompt_id for p in kept] == ["p2", "p3", "p5"]


def test_length_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="max_ratio must be >= 1"):
        cap_length_ratio([], {}, max_ratio=0.5)


# --- Length normalisation -------------------------------------------------------------

# p1: the longer answer scored higher; p2: three lengths, all scored 3.
LENGTH_BIASED = {
    "p1": [scored("a", 2.0, length=10), scored("b", 4.0, length=30)],
    "p2": [scored("c", 3.0, length=10), scored("d", 3.0, length=20), scored("e", 3.0, length=30), scored("f", None, length=99)],
}


def test_length_score_slope_is_the_pooled_within_prompt_slope():
    # p1: cov (-10)(-1) + (10)(1) = 20, var 200; p2: cov 0, var 200 -> 20 / 400.
    assert length_score_slope(LENGTH_BIASED) == pytest.approx(0.05)


def test_length_normalised_scores_remove_the_length_effect():
    adjusted = length_normalised(LENGTH_BIASED)

    assert [r.mean_score for r in adjusted["p1"]] == pytest.approx([2.5, 3.5])
    assert [r.mean_score for r in adjusted["p2"][:3]] == pytest.approx([3.5, 3.0, 2.5])
    assert adjusted["p2"][3].mean_score is None
    # At equal length the short answer in p2 is now preferred: the long answers' edge came from length.
    pairs = build_self_reward_pairs(adjusted, min_gap=0.5)
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [("b", "a"), ("c", "e")]
    assert [p.score_gap for p in pairs] == pytest.approx([1.0, 1.0])


def test_length_normalisation_without_length_variation_changes_nothing():
    same_length = {"p1": [scored("a", 2.0, length=10), scored("b", 4.0, length=10)]}

    assert length_score_slope(same_length) == 0.0
    assert length_normalised(same_length) == same_length
