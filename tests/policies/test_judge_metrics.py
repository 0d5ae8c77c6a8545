"""Each judge metric against values worked out by hand on fixed inputs."""

import math

import pytest

from policies.judge_metrics import (
    WarningThresholds,
    distribution_agreement,
    iteration_judge_metrics,
    judge_warnings,
    mean_or_none,
    pair_gaps,
    parse_failure_rate,
    pearson_correlation,
    position_bias_rate,
    sample_agreement,
    score_length_correlation,
    shrinking_streak,
)

# --- Parse failures -------------------------------------------------------------------


def test_parse_failure_rate_is_the_share_of_unread_samples():
    assert parse_failure_rate([4.0, None, 3.0, None]) == 0.5
    assert parse_failure_rate([None, None, None]) == 1.0
    assert parse_failure_rate([]) is None


# --- Self-agreement -------------------------------------------------------------------


def test_sample_agreement_counts_agreeing_pairs_within_each_response():
    # response 1: (4,4) agree, (4,3) and (4,3) do not; response 2: parsed (2,2) agree;
    # response 3 has one sample, so no pair: 2 of 4 pairs agree.
    samples = [[4.0, 4.0, 3.0], [2.0, None, 2.0], [5.0]]

    assert sample_agreement(samples) == 0.5


def test_sample_agreement_uses_the_tolerance_for_fractional_scores():
    assert sample_agreement([[3.2, 3.6]], tolerance=0.5) == 1.0
    assert sample_agreement([[3.0, 3.6]], tolerance=0.5) == 0.0


def test_sample_agreement_is_undefined_without_two_parsed_samples():
    assert sample_agreement([[4.0], [None, 3.0], []]) is None


def test_distribution_agreement_is_the_mean_collision_probability():
    # sum p^2: a certain judge 1.0, a coin flip between two scores 0.5.
    assert distribution_agreement([[1, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0]]) == 0.75
    assert distribution_agreement([[2.0, 2.0]]) == 0.5  # renormalised first
    assert distribution_agreement([]) is None


def test_distribution_agreement_refuses_an_empty_distribution():
    with pytest.raises(ValueError, match="positive mass"):
        distribution_agreement([[0.0, 0.0]])


# --- Position bias --------------------------------------------------------------------


def test_position_bias_rate_counts_verdicts_that_follow_the_position():
    verdicts = [
        ("A", "B"),  # candidate wins in both orders: consistent
        ("A", "A"),  # "whichever comes first": biased
        ("tie", "tie"),  # consistent
        ("B", "tie"),  # a win in one order only: biased
        (None, "A"),  # unreadable: left out
    ]

    assert position_bias_rate(verdicts) == 0.5


def test_position_bias_rate_is_undefined_without_readable_comparisons():
    assert position_bias_rate([(None, "A"), ("B", None)]) is None


# --- Length correlation ---------------------------------------------------------------


def test_pearson_correlation_matches_the_hand_computed_value():
    # dx = -1.5 -0.5 0.5 1.5, dy = -3 -1 0 4: cov 11, var_x 5, var_y 26.
    assert pearson_correlation([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize(("xs", "ys"), [([1, 2], [1, 2]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [4, 4, 4])])
def test_pearson_correlation_is_undefined_for_too_few_points_or_no_variance(xs, ys):
    assert pearson_correlation(xs, ys) is None


def test_score_length_correlation_leaves_unscored_responses_out():
    scored = [(1.0, 10), (2.0, 20), (None, 500), (3.0, 30)]

    assert score_length_correlation(scored) == pytest.approx(1.0)


# --- Pair gaps ------------------------------------------------------------------------


def test_pair_gaps_average_score_gaps_of_scored_pairs_and_length_gaps_of_all():
    gaps = pair_gaps([(2.0, 30, 10), (1.0, 10, 20), (None, 5, 5)])

    assert gaps["mean_score_gap"] == 1.5
    assert gaps["mean_length_gap"] == pytest.approx(10 / 3)  # (20 - 10 + 0) / 3


def test_pair_gaps_without_pairs_are_undefined():
    assert pair_gaps([]) == {"mean_score_gap": None, "mean_length_gap": None}
    assert mean_or_none([None]) is None


# --- Shrinking streak -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "streak"),
    [
        ([0.9, 0.8, 0.85, 0.7, 0.6], 2),
        ([1.0, 0.9, 0.8, 0.7], 3),
        ([0.5, 0.5], 0),  # equal is not shrinking
        ([1.0, None, 0.8, 0.7], 1),  # a missing value ends the streak
        ([0.7], 0),
        ([], 0),
    ],
)
def test_shrinking_streak_counts_consecutive_falls_at_the_end(values, streak):
    assert shrinking_streak(values) == streak


# --- Warnings -------------------------------------------------------------------------

THRESHOLDS = WarningThresholds(
    max_length_correlation=0.5, score_gap_shrinking_iterations=3, max_parse_failure_rate=0.5,
    max_position_bias_rate=0.5, min_self_agreement=0.4,
)


def test_warnings_fire_strictly_above_the_length_correlation_threshold():
    [line] = judge_warnings({"length_correlation": 0.62}, THRESHOLDS)
    assert "r=0.62 > 0.5" in line
    assert judge_warnings({"length_correlation": 0.5}, THRESHOLDS) == []
    assert judge_warnings({"length_correlation": None}, THRESHOLDS) == []


def test_warning_for_a_score_gap_shrinking_three_iterations_in_a_row():
    [line] = judge_warnings({"mean_score_gap": 0.7}, THRESHOLDS, score_gap_history=[1.0, 0.9, 0.8])
    assert "shrank 3 iterations in a row (1.00, 0.90, 0.80, 0.70)" in line
    assert judge_warnings({"mean_score_gap": 0.7}, THRESHOLDS, score_gap_history=[1.0, 0.9, 0.95]) == []
    assert judge_warnings({"mean_score_gap": 0.7}, THRESHOLDS, score_gap_history=[0.9, 0.8]) == []


def test_each_threshold_names_its_metric_and_none_switches_a_check_off():
    metrics = {"parse_failure_rate": 0.75, "position_bias_rate": 0.6, "self_agreement": 0.3}

    lines = judge_warnings(metrics, THRESHOLDS)

    assert [line.split(" ")[0:2] for line in lines] == [["judge", "parse-failure"], ["gate", "verdicts"], ["judge", "self-agreement"]]
    assert judge_warnings(metrics, WarningThresholds(None, None, None, None, None)) == []


def test_iteration_metrics_are_gathered_from_the_stage_results():
    results = {
        "judge": {"judgments": 8, "judge_metrics": {"parse_failure_rate": 0.25}},
        "build_pairs": {"pairs": 3, "judge_metrics": {"mean_score_gap": 1.5}},
        "dpo_update": {"steps": 2},
    }

    assert iteration_judge_metrics(results) == {"parse_failure_rate": 0.25, "mean_score_gap": 1.5}
