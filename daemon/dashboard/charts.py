"""Server-side inline SVG charts: no JavaScript library, nothing fetched by the browser.

Each function returns one ``<figure>`` as Markup. Colours come from CSS classes (``s0``..``s6``)
in static/dashboard.css; every point carries a ``<title>`` so the browser shows its value on hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 30
MAX_X_LABELS = 12


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


@dataclass(frozen=True)
class Frame:
    """Maps data coordinates to pixels inside the plotting area."""

    n: int
    y_min: float
    y_max: float

    def x(self, index: int) -> float:
        span = WIDTH - LEFT - RIGHT
        return LEFT + span * (index + 0.5) / max(self.n, 1)

    def y(self, value: float) -> float:
        span = HEIGHT - TOP - BOTTOM
        fraction = (value - self.y_min) / (self.y_max - self.y_min) if self.y_max > self.y_min else 0.5
        return HEIGHT - BOTTOM - span * fraction

    @property
    def slot(self) -> float:
        return (WIDTH - LEFT - RIGHT) / max(self.n, 1)


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(round((last - first) / step) + 1)]


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _y_range(values: Sequence[float], y_min: float | None, y_max: float | None) -> tuple[float, float]:
    low = y_min if y_min is not None else min(values, default=0.0)
    high = y_max if y_max is not None else max(values, default=1.0)
    if y_min is None and low > 0 and (high - low) > low:
        low = 0.0  # positive data whose spread dwarfs its floor reads better from zero
    if high <= low:
        low, high = low - 0.5, high + 0.5
    ticks = nice_ticks(low, high)
    return (ticks[0] if y_min is None else y_min), (ticks[-1] if y_max is None else y_max)


def _axes(frame: Frame, labels: Sequence[str], unit: str) -> list[str]:
    parts = []
    for tick in nice_ticks(frame.y_min, frame.y_max):
        if frame.y_min - 1e-9 <= tick <= frame.y_max + 1e-9:
            y = frame.y(tick)
            parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}{escape(unit)}</text>')
    every = max(1, math.ceil(len(labels) / MAX_X_LABELS))
    for index, label in enumerate(labels):
        if index % every == 0 or index == len(labels) - 1:
            parts.append(f'<text class="tick" x="{frame.x(index):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>')
    return parts


def _figure(title: str, body: list[str], legend: Sequence[str], chart_id: str, empty: bool) -> Markup:
    keys = "".join(f'<span class="key"><i class="swatch s{i}"></i>{escape(name)}</span>' for i, name in enumerate(legend))
    if empty:
        body = [f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data yet</text>']
    svg = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
        + "".join(body)
        + "</svg>"
    )
    return Markup(
        f'<figure class="chart" id="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>{svg}'
        f'<div class="legend">{keys}</div></figure>'
    )


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    chart_id: str,
    lower: Sequence[float | None] | None = None,
    upper: Sequence[float | None] | None = None,
    reference: tuple[float, str] | None = None,
    y_min: float | None = None,
    y_max: float | None = None,
    unit: str = "",
) -> Markup:
    """Lines with dots; ``lower`` (and ``upper``) draw a whisker from each point of the first series
    down (up) to it (a confidence bound), ``reference`` a dashed horizontal line (a threshold)."""
    values = [v for s in series for v in s.values if v is not None]
    values += [v for v in (*(lower or []), *(upper or [])) if v is not None] + ([reference[0]] if reference else [])
    frame = Frame(len(labels), *_y_range(values, y_min, y_max))
    body = _axes(frame, labels, unit)
    if reference is not None:
        y = frame.y(reference[0])
        body.append(f'<line class="reference" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"><title>{escape(reference[1])}</title></line>')
    for side, bounds in (("lower", lower), ("upper", upper)):
        for index, (value, bound) in enumerate(zip(series[0].values if series else [], bounds or [], strict=False)):
            if value is not None and bound is not None:
                x = frame.x(index)
                body.append(
                    f'<line class="whisker s0" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y(value):.1f}" y2="{frame.y(bound):.1f}">'
                    f"<title>{escape(labels[index])}: {side} bound {bound:.3f}</title></line>"
                )
                body.append(f'<line class="whisker-cap s0" x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{frame.y(bound):.1f}" y2="{frame.y(bound):.1f}"/>')
    for number, s in enumerate(series):
        body.extend(_polyline(frame, labels, s, f"s{number}"))
    return _figure(title, body, [s.name for s in series], chart_id, empty=not values)


def _polyline(frame: Frame, labels: Sequence[str], series: Series, css: str) -> list[str]:
    parts, run = [], []
    for index, value in enumerate(series.values):
        if value is None:
            run.append(None)
            continue
        x, y = frame.x(index), frame.y(value)
        run.append((x, y))
        parts.append(f'<circle class="dot {css}" cx="{x:.1f}" cy="{y:.1f}" r="3"><title>{escape(labels[index])}: {escape(series.name)} {value:.4g}</title></circle>')
    segments, current = [], []
    for point in run:  # a missing value breaks the line rather than bridging the gap
        if point is None:
            if len(current) > 1:
                segments.append(current)
            current = []
        else:
            current.append(point)
    if len(current) > 1:
        segments.append(current)
    lines = [f'<polyline class="line {css}" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in seg)}"/>' for seg in segments]
    return lines + parts


def stacked_bar_chart(
    title: str, labels: Sequence[str], stacks: Sequence[Series], *, chart_id: str, unit: str = "", y_max: float | None = None
) -> Markup:
    """One bar per label, split into the ``stacks`` (stage durations, score buckets)."""
    totals = [sum(s.values[i] or 0.0 for s in stacks) for i in range(len(labels))]
    frame = Frame(len(labels), *_y_range(totals + [0.0], 0.0, y_max))
    body = _axes(frame, labels, unit)
    width = max(1.0, frame.slot * 0.7)
    for index, label in enumerate(labels):
        base = 0.0
        for number, s in enumerate(stacks):
            value = s.values[index] or 0.0
            if value <= 0:
                continue
            top, bottom = frame.y(base + value), frame.y(base)
            body.append(
                f'<rect class="bar s{number}" x="{frame.x(index) - width / 2:.1f}" y="{top:.1f}" width="{width:.1f}" height="{max(bottom - top, 0.5):.1f}">'
                f"<title>{escape(label)}: {escape(s.name)} {value:.4g}{escape(unit)}</title></rect>"
            )
            base += value
    return _figure(title, body, [s.name for s in stacks], chart_id, empty=not any(totals))


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], *, chart_id: str, unit: str = "") -> Markup:
    return stacked_bar_chart(title, labels, [Series(title, values)], chart_id=chart_id, unit=unit)
