"""The pure parts of the dashboard: the lineage layout and the SVG charts."""

from __future__ import annotations

from daemon.dashboard.charts import Series, line_chart, nice_ticks, stacked_bar_chart
from daemon.dashboard.graph import layout, render_lineage_svg


def _node(cid: str, parent: str | None, status: str) -> dict:
    return {"id": cid, "parent": parent, "status": status, "iteration": None}


def test_accepted_checkpoints_share_a_lane_rejected_ones_hang_below_and_a_rollback_branches() -> None:
    nodes = [
        _node("ckpt-0000", None, "retired"),
        _node("ckpt-0001", "ckpt-0000", "retired"),  # promoted
        _node("ckpt-0002", "ckpt-0001", "rejected"),
        _node("ckpt-0003", "ckpt-0001", "retired"),  # promoted, then rolled back from
        _node("ckpt-0004", "ckpt-0001", "champion"),  # trained after the rollback to 0001: a branch
        _node("ckpt-0005", "ckpt-0004", "rejected"),
    ]
    rows = {n.id: n.row for n in layout(nodes, "ckpt-0004")}
    assert rows["ckpt-0000"] == rows["ckpt-0001"] == rows["ckpt-0003"] == 0
    assert rows["ckpt-0002"] == 1
    assert rows["ckpt-0004"] == 2 and rows["ckpt-0005"] == 3
    assert [n.column for n in layout(nodes, None)] == list(range(6))


def test_the_svg_escapes_ids_and_links_nodes_to_their_iterations() -> None:
    nodes = [_node("ckpt-0000", None, "champion"), {"id": "<x>", "parent": "ckpt-0000", "status": "rejected", "iteration": 7}]
    svg = str(render_lineage_svg(nodes, "ckpt-0000"))
    assert "<x>" not in svg and "&lt;x&gt;" in svg
    assert 'href="/iterations/7"' in svg
    assert svg.count('class="node champion"') == 1


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0, 1) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(87, 127)
    assert ticks[0] <= 87 and ticks[-1] >= 127 and ticks == [80, 90, 100, 110, 120, 130]


def test_a_missing_value_breaks_the_line_and_whiskers_reach_the_lower_bound() -> None:
    svg = str(line_chart("win", ["1", "2", "3", "4"], [Series("win rate", [0.5, None, 0.7, 0.8])], chart_id="c", lower=[0.2, None, 0.4, 0.5], y_min=0, y_max=1))
    assert svg.count("<polyline") == 1  # 3-4 only; 1 stands alone
    assert svg.count('class="whisker s0"') == 3
    assert svg.count("<circle") == 3


def test_stacked_bars_have_one_rect_per_nonzero_part_and_say_when_empty() -> None:
    svg = str(stacked_bar_chart("s", ["1", "2"], [Series("a", [1.0, 0.0]), Series("b", [2.0, 3.0])], chart_id="s"))
    assert svg.count("<rect") == 3
    empty = str(stacked_bar_chart("s", ["1"], [Series("a", [None])], chart_id="e"))
    assert "no data yet" in empty and "<rect" not in empty
