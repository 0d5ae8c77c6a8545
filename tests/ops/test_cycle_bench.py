"""ops.bench.cycle: the per-stage shares it prints add up with the overhead to the cycle's wall
time, the cycle ran on the model the option names, and refs are compared stage by stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.config import TINY_MODEL
from ops.bench.cycle import OVERHEAD, CycleTimes, measure_mode, print_comparison, print_cycles

SHARE_ROW = re.compile(r"^([a-z_]+(?: wall)?)\s+(-?\d+\.\d\d)\s+(-?\d+\.\d)%$")


def test_stage_shares_and_the_overhead_add_up_to_the_cycle_on_the_named_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread: None
) -> None:
    [cycle] = measure_mode(TINY_MODEL, "eager", 1, tmp_path, overrides={"training": {"max_steps": 2}})

    assert cycle.base_model == TINY_MODEL and cycle.model_path == TINY_MODEL
    assert "respond" in cycle.stage_seconds and "dpo_update" in cycle.stage_seconds
    assert all(seconds > 0 for seconds in cycle.stage_seconds.values())
    assert sum(cycle.stage_seconds.values()) + cycle.overhead_seconds == pytest.approx(cycle.wall_seconds)

    print_cycles("this tree", [cycle])
    out = capsys.readouterr().out
    assert f"model {TINY_MODEL} (model.path {TINY_MODEL})" in out
    rows = {m[1]: (float(m[2]), float(m[3])) for line in out.splitlines() if (m := SHARE_ROW.match(line))}
    assert list(rows) == [*cycle.stage_seconds, OVERHEAD, "cycle wall"]
    wall_seconds, wall_share = rows.pop("cycle wall")
    assert wall_share == 100.0 and wall_seconds == pytest.approx(cycle.wall_seconds, abs=0.005)
    # Each printed number is off by at most half its last digit.
    assert sum(share for _, share in rows.values()) == pytest.approx(100.0, abs=0.05 * len(rows))
    assert sum(seconds for seconds, _ in rows.values()) == pytest.approx(wall_seconds, abs=0.005 * (len(rows) + 1))


def test_the_comparison_prints_each_refs_seconds_and_shares_and_the_ratio_to_the_first(capsys: pytest.CaptureFixture[str]) -> None:
    before = CycleTimes("local", 10.0, {"respond": 6.0, "judge": 3.0}, "m", "smollm2")
    after = CycleTimes("local", 5.0, {"respond": 3.0, "judge": 1.5, "evaluate_suites": 0.25}, "m", "smollm2")

    print_comparison(["before", "after"], [[before], [after]])

    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["respond"] == ["6.00", "60.0%", "3.00", "60.0%", "0.50x"]
    assert lines["evaluate_suites"] == ["-", "-", "0.25", "5.0%", "-"]
    assert lines[OVERHEAD] == ["1.00", "10.0%", "0.25", "5.0%", "0.25x"]
    assert lines["cycle"] == ["wall", "10.00", "100.0%", "5.00", "100.0%", "0.50x"]
