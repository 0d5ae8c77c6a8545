"""The lineage graph: a checkpoint tree laid out on a time axis and drawn as inline SVG.

Columns are creation order. Each line of descent has a lane: a checkpoint that was accepted
(champion, retired champion, pending candidate) continues its parent's lane unless another
accepted child already did, in which case it opens a new lane (a branch, e.g. after a rollback).
Rejected candidates hang in the row just below their parent's lane, greyed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

COLUMN, ROW, MARGIN_X, MARGIN_Y = 30, 34, 28, 22
REJECTED = "rejected"


@dataclass(frozen=True)
class PlacedNode:
    id: str
    parent: str | None
    status: str
    column: int
    row: int
    label: str
    tooltip: str
    iteration: int | None


def _short_label(checkpoint_id: str) -> str:
    # "ckpt-0042" -> "42": the column already says where in time it is, the tooltip says the rest.
    tail = checkpoint_id.rsplit("-", 1)[-1]
    return (tail.lstrip("0") or "0") if tail.isdigit() else checkpoint_id[:8]


def _tooltip(node: dict[str, Any], champion: str | None) -> str:
    parts = [node["id"], "champion" if node["id"] == champion else node["status"]]
    if node.get("iteration") is not None:
        parts.append(f"iteration {node['iteration']}")
    if node.get("win_rate") is not None:
        bound = node.get("win_rate_lower_bound")
        parts.append(f"win rate {node['win_rate']:.2f}" + (f" (lower bound {bound:.2f})" if bound is not None else ""))
    if node.get("decision"):
        parts.append(f"decision {node['decision']}")
    for suite, result in sorted((node.get("suites") or {}).items()):
        parts.append(f"{suite} {result['score']:.3f} [{result['ci_low']:.2f}, {result['ci_high']:.2f}]")
    return " · ".join(parts)


def layout(nodes: Sequence[dict[str, Any]], champion: str | None) -> list[PlacedNode]:
    """Place ``nodes`` (oldest first, each with id, parent, status) on columns and rows."""
    lane_of: dict[str, int] = {}
    continued: set[str] = set()
    lanes = 0
    placed = []
    for column, node in enumerate(nodes):
        parent = node.get("parent")
        rejected = node["status"] == REJECTED
        if parent in lane_of and (rejected or parent not in continued):
            lane = lane_of[parent]
            if not rejected:
                continued.add(parent)
        else:
            lane, lanes = lanes, lanes + 1
        lane_of[node["id"]] = lane
        row = 2 * lane + (1 if rejected else 0)
        placed.append(
            PlacedNode(node["id"], parent, node["status"], column, row, _short_label(node["id"]), _tooltip(node, champion), node.get("iteration"))
        )
    return placed


def _xy(node: PlacedNode) -> tuple[float, float]:
    return MARGIN_X + node.column * COLUMN, MARGIN_Y + node.row * ROW


def _edge_path(parent: PlacedNode, child: PlacedNode, blocked: bool) -> str:
    (x1, y1), (x2, y2) = _xy(parent), _xy(child)
    if y1 == y2:
        return f"M{x1:.0f},{y1:.0f} H{x2:.0f}"
    if child.status == REJECTED and not blocked:
        # Along the parent's lane, then down: a row of rejected tries under the champion that made them.
        return f"M{x1:.0f},{y1:.0f} H{x2:.0f} V{y2:.0f}"
    if child.status != REJECTED:
        return f"M{x1:.0f},{y1:.0f} V{y2:.0f} H{x2:.0f}"  # a branch leaves its parent downwards
    middle = (x1 + x2) / 2
    return f"M{x1:.0f},{y1:.0f} C{middle:.0f},{y1:.0f} {middle:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"


def render_lineage_svg(nodes: Sequence[dict[str, Any]], champion: str | None) -> Markup:
    placed = layout(nodes, champion)
    by_id = {n.id: n for n in placed}
    # A later checkpoint on the parent's own row would sit on the elbow; such edges curve instead.
    row_columns: dict[int, list[int]] = {}
    for n in placed:
        row_columns.setdefault(n.row, []).append(n.column)
    edges, circles = [], []
    for n in placed:
        parent = by_id.get(n.parent) if n.parent else None
        if parent is not None:
            blocked = any(parent.column < c < n.column for c in row_columns[parent.row])
            css = "edge rejected" if n.status == REJECTED else "edge"
            edges.append(f'<path class="{css}" d="{_edge_path(parent, n, blocked)}"/>')
        x, y = _xy(n)
        css = "champion" if n.id == champion else n.status
        radius = 9 if n.id == champion else (5 if n.status == REJECTED else 7)
        href = f"/iterations/{n.iteration}" if n.iteration is not None else None
        circle = (
            f'<g class="node {escape(css)}" data-checkpoint="{escape(n.id)}" data-status="{escape(n.status)}" tabindex="0">'
            f'<title>{escape(n.tooltip)}</title><circle cx="{x}" cy="{y}" r="{radius}"/>'
            f'<text x="{x}" y="{y - radius - 4}" text-anchor="middle">{escape(n.label)}</text></g>'
        )
        circles.append(f'<a href="{href}">{circle}</a>' if href else circle)
    width = MARGIN_X * 2 + max((n.column for n in placed), default=0) * COLUMN
    height = MARGIN_Y * 2 + max((n.row for n in placed), default=0) * ROW
    return Markup(
        f'<svg id="lineage-graph" class="lineage" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="checkpoint lineage">{"".join(edges)}{"".join(circles)}</svg>'
    )
