from __future__ import annotations

from policies.score_bins import UNPARSEABLE, empty_histogram, fit_bins, score_bucket


def test_whole_scores_keep_whole_buckets_and_the_unparseable_have_their_own() -> None:
    assert [score_bucket(s) for s in (None, 0.4, 1.0, 3.9, 5.0, 7.0)] == [UNPARSEABLE, "1", "1", "3", "5", "5"]
    assert empty_histogram() == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0, UNPARSEABLE: 0}
    assert fit_bins({1.0: 2, 3.0: 1}) == {"1": 2, "2": 0, "3": 1}


def test_expected_scores_get_round_bins_over_their_range_and_nothing_is_lost() -> None:
    counts = {2.21: 3, 2.37: 1, 2.8: 2}
    bins = fit_bins(counts, target_bins=10)
    # Bins of 0.1 from 2.2 to 2.9; the empty ones inside the range stay, so the shape shows.
    assert bins == {"2.2-2.3": 3, "2.3-2.4": 1, "2.4-2.5": 0, "2.5-2.6": 0, "2.6-2.7": 0, "2.7-2.8": 0, "2.8-2.9": 2}
    assert fit_bins({}) == {} and fit_bins({2.5: 4}) == {"2.5": 4}
