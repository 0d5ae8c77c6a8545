import math

import pytest

from policies.gate import (
    GateDecision,
    GateRule,
    GateStats,
    SuiteComparison,
    combine_two_orders,
    decide,
    tally,
    wilson_lower_bound,
)

RULE = GateRule()


def stats(wins=0, losses=0, ties=0, unparseable=0, candidate_length=100.0, champion_length=100.0) -> GateStats:
    return GateStats(wins, losses, ties, unparseable, candidate_length, champion_length)


# --- Wilson bound ---------------------------------------------------------------------


def test_wilson_lower_bound_matches_hand_computed_value():
    # p=0.8, n=10: (0.8 + 0.19208 - 1.96*sqrt(0.016 + 0.009604)) / 1.38416
    assert wilson_lower_bound(8, 10) == pytest.approx(0.4902, abs=1e-4)


def test_wilson_lower_bound_is_zero_without_data():
    assert wilson_lower_bound(0, 0) == 0.0


def test_wilson_lower_bound_grows_with_evidence_at_the_same_rate():
    assert wilson_lower_bound(4, 5) < wilson_lower_bound(80, 100) < 0.8


def test_wilson_lower_bound_accepts_half_successes():
    assert wilson_lower_bound(8, 10) < wilson_lower_bound(8.5, 10) < wilson_lower_bound(9, 10)


def test_wilson_lower_bound_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson_lower_bound(11, 10)


# --- Two orders -----------------------------------------------------------------------


def test_consistent_verdicts_give_the_winner():
    # Order 1: candidate is A. Order 2: candidate is B.
    assert combine_two_orders("A", "B") == "candidate"
    assert combine_two_orders("B", "A") == "champion"
    assert combine_two_orders("tie", "tie") == "tie"


def test_a_verdict_that_follows_the_position_counts_as_a_tie():
    assert combine_two_orders("A", "A") == "tie"
    assert combine_two_orders("B", "B") == "tie"


def test_one_decisive_and_one_tied_order_counts_as_a_tie():
    assert combine_two_orders("A", "tie") == "tie"


def test_a_failed_order_gives_none():
    assert combine_two_orders(None, "B") is None
    assert combine_two_orders("A", None) is None


def test_unknown_verdict_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown verdict"):
        combine_two_orders("C", "A")


# --- Tally ----------------------------------------------------------------------------


def test_tally_counts_outcomes_and_averages_lengths():
    result = tally(["candidate", "candidate", "champion", "tie", None], [100, 200], [120, 180])

    assert result == GateStats(2, 1, 1, 1, 150.0, 150.0)
    assert result.n == 4
    assert result.win_rate == pytest.approx(2.5 / 4)
    assert result.length_ratio == 1.0
    assert result.parse_failure_rate == pytest.approx(1 / 5)


def test_length_ratio_edge_cases():
    assert stats(candidate_length=0, champion_length=0).length_ratio == 1.0
    assert stats(candidate_length=10, champion_length=0).length_ratio == math.inf


# --- Decision -------------------------------------------------------------------------


def test_clear_win_is_promoted():
    decision = decide(stats(wins=18, losses=2), RULE)

    assert decision.promote
    assert decision.win_rate_lower_bound == pytest.approx(0.699, abs=1e-3)
    assert decision.reasons[0].startswith("clear win")


def test_loss_is_rejected():
    decision = decide(stats(wins=2, losses=18), RULE)

    assert not decision.promote
    assert any("no clear win" in r for r in decision.reasons)


@pytest.mark.parametrize("result", [stats(ties=20), stats(wins=10, losses=10), stats(wins=5, losses=5, ties=10)])
def test_tie_is_rejected(result):
    decision = decide(result, RULE)

    assert not decision.promote
    assert decision.win_rate == 0.5
    assert any(r.startswith("no clear win") for r in decision.reasons)


def test_too_few_comparisons_is_rejected_even_if_all_won():
    decision = decide(stats(wins=3), RULE)

    assert not decision.promote
    assert "too few comparisons: 3 usable, need at least 4" in decision.reasons


def test_length_blow_up_is_rejected_even_with_a_clear_win():
    decision = decide(stats(wins=18, losses=2, candidate_length=300, champion_length=100), RULE)

    assert not decision.promote
    assert decision.reasons == (
        "length blow-up: candidate answers are 3.00x the champion's length (mean 300.0 vs 100.0), max 1.50x",
    )


def test_high_parse_failure_rate_is_rejected_even_with_a_clear_win():
    decision = decide(stats(wins=18, losses=2, unparseable=30), RULE)

    assert not decision.promote
    assert decision.reasons == ("too many unparseable comparisons: 30 of 50 (60%), max 50%",)


def test_every_failed_check_is_reported():
    decision = decide(stats(wins=1, losses=1, unparseable=5, candidate_length=500), RULE)

    assert len(decision.reasons) == 4


def test_bound_exactly_at_the_bar_is_not_enough():
    result = stats(wins=18, losses=2)
    bar = wilson_lower_bound(result.successes, result.n)

    assert not decide(result, GateRule(min_win_rate_lower_bound=bar)).promote


def test_decision_as_dict_is_json_friendly():
    decision = decide(stats(wins=18, losses=2, candidate_length=10, champion_length=0), RULE)
    data = decision.as_dict()

    assert isinstance(decision, GateDecision)
    assert data["reasons"] == list(decision.reasons)
    assert data["length_ratio"] is None
    assert set(data) == {
        "promote",
        "reasons",
        "win_rate",
        "win_rate_lower_bound",
        "length_ratio",
        "parse_failure_rate",
        "n",
        "route",
        "suites",
    }


def test_rule_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        GateRule(min_comparisons=0)
    with pytest.raises(ValueError):
        GateRule(max_parse_failure_rate=1.5)


# --- Suite route ----------------------------------------------------------------------

SUITE_RULE = GateRule(improve_suites=("instruct-checks",), regression_tolerance=0.02)


def suite(name, candidate, champion, lower, upper, n=200):
    return SuiteComparison(name, n, candidate, champion, lower, upper, minimum_detectable=0.06)


def test_suite_improvement_promotes_when_pairwise_is_all_ties():
    decision = decide(stats(ties=8), SUITE_RULE, [suite("instruct-checks", 0.40, 0.30, 0.04, 0.16)])

    assert decision.promote and decision.route == "suite"
    assert "instruct-checks: 0.400 vs 0.300 over 200 items" in decision.reasons[0]
    assert decision.as_dict()["suites"][0]["difference"] == pytest.approx(0.10)


def test_suite_improvement_whose_lower_bound_is_not_above_zero_does_not_promote():
    decision = decide(stats(ties=8), SUITE_RULE, [suite("instruct-checks", 0.33, 0.30, -0.01, 0.07)])

    assert not decision.promote and decision.route is None
    assert any("no significant suite improvement" in r for r in decision.reasons)


def test_regression_on_another_suite_blocks_a_suite_promotion():
    suites = [suite("instruct-checks", 0.40, 0.30, 0.04, 0.16), suite("pairwise-vs-initial", 0.40, 0.50, -0.2, 0.0)]

    decision = decide(stats(ties=8), SUITE_RULE, suites)

    assert not decision.promote
    assert any(r.startswith("regression on pairwise-vs-initial") for r in decision.reasons)


def test_regression_within_tolerance_does_not_block():
    suites = [suite("instruct-checks", 0.40, 0.30, 0.04, 0.16), suite("other", 0.49, 0.50, -0.1, 0.08)]

    assert decide(stats(ties=8), SUITE_RULE, suites).promote


def test_regression_blocks_a_pairwise_win_too():
    decision = decide(stats(wins=19, losses=1), SUITE_RULE, [suite("instruct-checks", 0.20, 0.30, -0.16, -0.04)])

    assert not decision.promote
    assert any(r.startswith("regression on instruct-checks") for r in decision.reasons)


def test_length_blow_up_still_blocks_a_suite_promotion():
    decision = decide(stats(ties=8, candidate_length=200, champion_length=100), SUITE_RULE, [suite("instruct-checks", 0.4, 0.3, 0.04, 0.16)])

    assert not decision.promote
    assert any(r.startswith("length blow-up") for r in decision.reasons)


def test_a_suite_that_is_not_an_improve_suite_cannot_carry_a_promotion():
    decision = decide(stats(ties=8), SUITE_RULE, [suite("jsonl", 0.9, 0.1, 0.7, 0.9)])

    assert not decision.promote
    assert any("none of instruct-checks was evaluated" in r for r in decision.reasons)
