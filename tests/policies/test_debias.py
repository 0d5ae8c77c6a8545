"""The swap average: a constant position bias cancels, a real preference survives."""

from __future__ import annotations

import math

import pytest

from policies import debias


def _judge(preference_log_odds: float, position_offset: float, tie: float = 0.0) -> tuple[list[float], list[float]]:
    """A synthetic judge: log-odds s for X plus a constant offset b for whichever answer is shown
    first. Returns its (P(A), P(B), P(tie)) with X first, then with X second."""

    def order(log_odds_a: float) -> list[float]:
        p_a = (1 - tie) / (1 + math.exp(-log_odds_a))
        return [p_a, (1 - tie) - p_a, tie]

    return order(preference_log_odds + position_offset), order(-preference_log_odds + position_offset)


@pytest.mark.parametrize("offset", [0.0, 1.5, 3.0, -2.0])
def test_a_constant_position_bias_alone_gives_exactly_one_half(offset: float) -> None:
    first, second = _judge(0.0, offset, tie=0.1)

    average = debias.swap_average(first, second)

    assert average.preference == pytest.approx(0.5, abs=1e-12)
    assert average.log_odds_preference == pytest.approx(0.5, abs=1e-12)
    assert debias.verdict(average.preference, margin=0.05) == "tie"
    # The raw orders disagree by the bias; the position metric sees it.
    assert average.position_preference == pytest.approx(1 / (1 + math.exp(-offset)))


@pytest.mark.parametrize("offset", [0.0, 1.0, 2.5])
def test_a_real_preference_keeps_its_direction_under_any_constant_bias(offset: float) -> None:
    better, worse = _judge(1.2, offset), _judge(-1.2, offset)

    for (first, second), expected in ((better, "a"), (worse, "b")):
        average = debias.swap_average(first, second)
        # The log-odds average recovers the bias-free preference exactly...
        assert average.log_odds_preference == pytest.approx(1 / (1 + math.exp(-1.2 if expected == "a" else 1.2)))
        # ...and the probability average keeps its side of 1/2.
        assert (average.preference > 0.5) == (expected == "a")
        assert debias.verdict(average.preference, margin=0.05) == expected


def test_strong_position_bias_shrinks_the_probability_average_towards_one_half() -> None:
    # P(A) ~ 0.95 in both orders (as SmolLM2-135M does): the content signal is small next to it.
    mild = debias.swap_average(*_judge(0.5, 0.0))
    biased = debias.swap_average(*_judge(0.5, 3.0))
    assert 0.5 < biased.preference < mild.preference
    assert biased.log_odds_preference == pytest.approx(mild.log_odds_preference)


def test_the_position_bias_metric_is_zero_for_a_fair_judge_and_one_for_a_slot_picker() -> None:
    fair = debias.swap_average(*_judge(2.0, 0.0))
    slot_picker = debias.swap_average([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])  # always "A"
    assert debias.position_bias([fair.position_preference]) == pytest.approx(0.0)
    assert debias.position_bias([slot_picker.position_preference]) == pytest.approx(1.0)
    assert slot_picker.preference == 0.5
    assert debias.position_bias([]) is None
    summary = debias.summarise([fair, slot_picker])
    assert summary["n"] == 2 and summary["position_bias"] == pytest.approx(0.5)


def test_sampled_letters_debias_the_same_way() -> None:
    letters = debias.letter_distribution
    assert debias.swap_average(letters("A"), letters("B")).preference == 1.0  # X won in both orders
    assert debias.swap_average(letters("A"), letters("A")).preference == 0.5  # position only
    assert debias.swap_average(letters("A"), letters("tie")).preference == 0.75  # a win and a tie
    assert debias.swap_average(letters("tie"), letters("tie")).preference == 0.5
    with pytest.raises(ValueError, match="unknown verdict"):
        letters("C")


def test_a_verdict_needs_the_margin() -> None:
    assert debias.verdict(0.54, margin=0.05) == "tie"
    assert debias.verdict(0.56, margin=0.05) == "a"
    assert debias.verdict(0.44, margin=0.05) == "b"
    assert debias.verdict(0.51, margin=0.0) == "a"
    assert debias.verdict(None, margin=0.05) is None
    with pytest.raises(ValueError, match="margin"):
        debias.verdict(0.5, margin=0.5)


def test_no_mass_on_either_letter_is_no_preference() -> None:
    assert debias.preference_in_order(0.0, 0.0) == 0.5
    with pytest.raises(ValueError):
        debias.preference_in_order(-0.1, 0.5)
