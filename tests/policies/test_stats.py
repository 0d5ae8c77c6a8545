import math

import pytest

from policies.gate import wilson_lower_bound
from policies.stats import minimum_detectable_difference, paired_bootstrap, proportion_ci, z_for


def test_identical_scores_give_a_degenerate_interval_at_zero():
    scores = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]

    assert paired_bootstrap(scores, scores, n_resamples=500, seed=3) == (0.0, 0.0, 0.0)


def test_a_clear_shift_has_a_lower_bound_above_zero():
    champion = [1] * 30 + [0] * 10
    initial = [0] * 25 + [1] * 5 + [0] * 10

    diff, low, high = paired_bootstrap(champion, initial, n_resamples=2000, seed=0)

    assert diff == pytest.approx(25 / 40)
    assert 0 < low < diff < high <= 1


def test_noise_without_a_shift_has_an_interval_around_zero():
    a = [1, 0] * 20
    b = [0, 1] * 20

    diff, low, high = paired_bootstrap(a, b, n_resamples=2000, seed=1)

    assert diff == 0
    assert low < 0 < high


def test_bootstrap_is_deterministic_per_seed_and_checks_its_input():
    a, b = [1, 0, 1, 1], [0, 0, 1, 0]
    assert paired_bootstrap(a, b, 300, seed=5) == paired_bootstrap(a, b, 300, seed=5)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1, 0], [1], 10)
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], [], 10)


def test_wilson_interval_matches_the_gate_lower_bound_and_contains_the_rate():
    low, high = proportion_ci(30, 40)

    assert low == pytest.approx(wilson_lower_bound(30, 40, z=z_for(0.95)))
    assert low < 0.75 < high
    assert proportion_ci(0, 0) == (0.0, 1.0)
    assert proportion_ci(0, 10)[0] == 0.0
    assert proportion_ci(10, 10)[1] == 1.0


def test_interval_narrows_with_more_items():
    small = proportion_ci(5, 10)
    large = proportion_ci(500, 1000)

    assert large[1] - large[0] < small[1] - small[0]


def test_minimum_detectable_difference_follows_the_rule_of_thumb():
    mdd = minimum_detectable_difference(240, 0.5)

    assert mdd == pytest.approx(1.959964 * math.sqrt(2 * 0.25 / 240), rel=1e-5)
    assert minimum_detectable_difference(960, 0.5) == pytest.approx(mdd / 2)
    assert minimum_detectable_difference(240, 0.5, power=0.8) > mdd
    assert minimum_detectable_difference(240, 0.0) == 0.0
    with pytest.raises(ValueError):
        minimum_detectable_difference(0, 0.5)
