"""The end-of-turn ramp: nothing before its start, a linear rise to the full bonus at the budget's
last token, and clear errors for settings that make no sense."""

from __future__ import annotations

import pytest

from policies.end_ramp import EndRamp


def test_no_bonus_until_the_start_share_of_the_budget() -> None:
    ramp = EndRamp(6.0, start=0.5)
    assert [ramp.bonus_at(g, 128) for g in (0, 10, 63, 64)] == [0.0, 0.0, 0.0, 0.0]
    assert ramp.bonus_at(65, 128) > 0.0


def test_rises_linearly_to_the_full_bonus_at_the_last_token() -> None:
    ramp = EndRamp(6.0, start=0.5)
    assert ramp.bonus_at(127, 128) == pytest.approx(6.0)  # 127 generated: the next token is the budget's last
    assert ramp.bonus_at(95.5, 128) == pytest.approx(3.0)  # type: ignore[arg-type]  # half way from 64 to 127
    steps = [ramp.bonus_at(g, 128) for g in range(64, 128)]
    assert steps == sorted(steps)
    assert ramp.bonus_at(500, 128) == pytest.approx(6.0), "never above the full bonus"


def test_a_start_at_the_last_token_gives_the_bonus_only_there() -> None:
    ramp = EndRamp(4.0, start=0.9)
    assert ramp.bonus_at(8, 10) == 0.0
    assert ramp.bonus_at(9, 10) == pytest.approx(4.0)


def test_a_zero_bonus_adds_nothing_anywhere() -> None:
    assert {EndRamp(0.0).bonus_at(g, 16) for g in range(20)} == {0.0}


@pytest.mark.parametrize("bonus, start", [(-1.0, 0.5), (3.0, 1.0), (3.0, -0.1)])
def test_settings_outside_their_range_are_refused(bonus: float, start: float) -> None:
    with pytest.raises(ValueError, match="end ramp"):
        EndRamp(bonus, start)
