import random
from collections import Counter

import pytest

from policies.constraints import sample_constraints
from policies.curriculum import WEIGHT_FLOOR, KindRecord, learnability_weights, tally


def test_tally_counts_passes_per_kind():
    records = tally([("lowercase", True), ("lowercase", False), ("title", True)])

    assert records == {"lowercase": KindRecord(1, 2), "title": KindRecord(1, 1)}
    assert KindRecord().pass_rate == 0.5
    assert KindRecord(9, 10).pass_rate == pytest.approx(10 / 12)


def test_weights_favour_kinds_whose_samples_disagree():
    records = {"always": KindRecord(40, 40), "never": KindRecord(0, 40), "half": KindRecord(20, 40)}
    weights = learnability_weights(["always", "never", "half", "unseen"], records)

    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["half"] > weights["always"] and weights["half"] > weights["never"]
    # No history is no evidence: an unseen kind gets the full weight of a 50% kind.
    assert weights["unseen"] == pytest.approx(weights["half"], rel=0.01)
    # The floor keeps a kind the model cannot do yet in the draw.
    assert weights["never"] / weights["half"] == pytest.approx(WEIGHT_FLOOR, rel=0.01)


def test_weighted_draws_follow_the_weights_and_stay_deterministic():
    weights = {"lowercase": 0.7, "no_commas": 0.2, "title": 0.1}
    rng = random.Random(0)
    firsts = Counter(sample_constraints(rng, 1, kinds=list(weights), weights=weights)[0].kind for _ in range(3000))

    assert firsts["lowercase"] / 3000 == pytest.approx(0.7, abs=0.03)
    assert firsts["title"] / 3000 == pytest.approx(0.1, abs=0.02)
    again = [sample_constraints(random.Random(5), 2, kinds=list(weights), weights=weights) for _ in range(2)]
    assert again[0] == again[1] and len({c.kind for c in again[0]}) == 2


def test_a_repairable_kind_stays_learnable_though_no_sample_passes():
    # With repaired pairs every failing sample is a pair, so "never" is as worth a prompt as "half".
    records = {"never": KindRecord(0, 40), "half": KindRecord(20, 40), "always": KindRecord(40, 40)}
    plain = learnability_weights(["never", "half", "always"], records)
    repaired = learnability_weights(["never", "half", "always"], records, repairable={"never", "always"})

    assert repaired["never"] == pytest.approx(repaired["half"], rel=0.03) and plain["never"] < plain["half"] / 5
    # Mastered kinds still fade: a repair of an answer that passes is no pair.
    assert repaired["always"] / repaired["half"] == pytest.approx(WEIGHT_FLOOR, rel=0.3)
