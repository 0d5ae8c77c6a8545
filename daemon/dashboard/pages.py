"""Template contexts: the view data of daemon.views turned into what the pages show."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from sqlalchemy.orm import Session

from daemon import views
from daemon.config import Settings
from daemon.dashboard.charts import Series, bar_chart, line_chart, stacked_bar_chart
from daemon.dashboard.graph import REJECTED, render_lineage_svg
from daemon.db.models import Event
from daemon.stage_specs import STAGE_LABELS, STAGE_ORDER
from policies.score_bins import SCORE_BUCKETS, UNPARSEABLE



def _iteration_charts(iterations: list[dict[str, Any]], settings: Settings) -> dict[str, Markup]:
    labels = [str(it["iteration"]) for it in iterations]
    gates = [it["gate"] or {} for it in iterations]
    threshold = settings.gate.min_win_rate_lower_bound
    histogram_keys = [*map(str, SCORE_BUCKETS), UNPARSEABLE]
    return {
        "win_rate": line_chart(
            "Gate win rate (whisker: Wilson lower bound)", labels, [Series("win rate", [g.get("win_rate") for g in gates])],
            chart_id="chart-win-rate", lower=[g.get("win_rate_lower_bound") for g in gates],
            reference=(threshold, f"gate threshold: lower bound must exceed {threshold}"), y_min=0.0, y_max=1.0,
        ),
        "scores": stacked_bar_chart(
            "Judge-score distribution (judgments per score)", labels,
            [Series(f"score {k}" if k != UNPARSEABLE else k, [it["score_histogram"][k] for it in iterations]) for k in histogram_keys],
            chart_id="chart-scores",
        ),
        "training": line_chart(
            "DPO training (mean over logged steps)", labels,
            [Series("loss", [it["training"]["loss"] for it in iterations]), Series("reward margin", [it["training"]["reward_margin"] for it in iterations])],
            chart_id="chart-training",
        ),
        "length": line_chart(
            "Mean response length", labels, [Series("tokens", [it["mean_response_tokens"] for it in iterations])],
            chart_id="chart-length", unit="",
        ),
        "stages": stacked_bar_chart(
            "Stage durations", labels,
            [Series(STAGE_LABELS[s], [(it["stages"].get(s) or {}).get("seconds") for it in iterations]) for s in STAGE_ORDER
             if any(s in it["stages"] for it in iterations)],
            chart_id="chart-stages", unit="s",
        ),
    }


def suite_charts(history: dict[str, list[dict[str, Any]]]) -> list[Markup]:
    """One chart per evaluation suite: its score along the champion history, 95% interval as whiskers."""
    charts = []
    for number, (suite, points) in enumerate(sorted(history.items())):
        charts.append(line_chart(
            f"{suite} over the champion history (whiskers: 95% interval)", [p["checkpoint"] for p in points],
            [Series(suite, [p["score"] for p in points])], chart_id=f"chart-suite-{number}",
            lower=[p["ci_low"] for p in points], upper=[p["ci_high"] for p in points], y_min=0.0, y_max=1.0,
        ))
    return charts


def _notice(session: Session, done: int | None, unchanged: str | None) -> str | None:
    if unchanged:
        return f"{unchanged}: nothing to change"
    event = session.get(Event, done) if done else None
    if event is None:
        return None
    target = f" {event.checkpoint_id}" if event.checkpoint_id else ""
    previous = f" (was {event.previous_checkpoint_id})" if event.previous_checkpoint_id else ""
    return f"done: {event.kind}{target}{previous} by {event.actor}"


def overview_context(session: Session, settings: Settings, window: int, done: int | None, unchanged: str | None) -> dict[str, Any]:
    status = views.status_view(session)
    graph = views.lineage_graph(session)
    iterations = views.recent_iterations(session, window)
    promotable = [n for n in reversed(graph["nodes"]) if n["status"] != REJECTED and n["id"] != status["champion"]]
    return {
        "status": status,
        "graph_svg": render_lineage_svg(graph["nodes"], graph["champion"]),
        "graph_truncated": graph["truncated"],
        "promotable": promotable,
        "charts": _iteration_charts(iterations, settings),
        "suite_charts": suite_charts(views.suite_history(session)),
        "suite_scores": [(n["id"], n["suites"]) for n in reversed(graph["nodes"]) if n["suites"]][:25],
        "iterations": list(reversed(iterations))[:25],
        "events": views.recent_events(session, 50),
        "notice": _notice(session, done, unchanged),
        "window": window,
        "stage_labels": STAGE_LABELS,
    }


def iteration_context(session: Session, iteration_id: int) -> dict[str, Any]:
    detail = views.iteration_detail(session, iteration_id)
    histogram = detail["score_histogram"]
    steps = detail["training_log"]
    step_labels = [str(s["step"]) for s in steps]
    stage_names = [s for s in STAGE_ORDER if s in detail["stages"]]
    return {
        "it": detail,
        "charts": {
            "scores": bar_chart("Judge scores", list(histogram), list(histogram.values()), chart_id="chart-iteration-scores"),
            "training": line_chart(
                "DPO training log (per step)", step_labels,
                [Series("loss", [s["loss"] for s in steps]), Series("reward margin", [s["reward_margin"] for s in steps])],
                chart_id="chart-iteration-training",
            ),
            "stages": bar_chart(
                "Stage durations", [STAGE_LABELS[s] for s in stage_names],
                [detail["stages"][s]["seconds"] or 0.0 for s in stage_names], chart_id="chart-iteration-stages", unit="s",
            ),
        },
        "stage_labels": STAGE_LABELS,
    }
