"""The reads the dashboard and /metrics make, each timed in a fresh session per call."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from daemon.config import Settings
from daemon.db.engine import make_session_factory


class _Borrowed:
    """Lets the metrics collector use the benchmark's session as if it opened its own."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __enter__(self) -> Any:
        return self.session

    def __exit__(self, *exc: Any) -> None:
        return None


def _metrics_scrape() -> Callable[[Any], Any]:
    from daemon.metrics import LineageCollector

    # One collector for all calls, as in a long-lived dashboard process: its first (warm-up) call
    # sums every finished stage run, later scrapes only what changed since.
    collector = LineageCollector(None)  # type: ignore[arg-type]

    def scrape(session):  # type: ignore[no-untyped-def]
        collector.sessions = lambda: _Borrowed(session)  # type: ignore[assignment]
        return list(collector.collect())

    return scrape


def dashboard_queries(iterations: int, rng: random.Random) -> dict[str, Callable[[Any], Any]]:
    """Each read the dashboard (and /metrics) makes, as a function of a fresh session."""
    from daemon import views
    from daemon.dashboard import pages

    settings = Settings()
    return {
        "status (champion, pause, counts)": views.status_view,
        "lineage graph (60 newest checkpoints)": lambda s: views.lineage_graph(s, 60),
        "recent iterations + score histograms (50)": lambda s: views.recent_iterations(s, 50),
        "events (50 newest)": lambda s: views.recent_events(s, 50),
        "iteration detail (random iteration)": lambda s: views.iteration_detail(s, rng.randint(1, iterations)),
        "overview page context (all of the above + SVG)": lambda s: pages.overview_context(s, settings, 50, None, None),
        "/metrics scrape": _metrics_scrape(),
    }


def time_queries(engine: Engine, iterations: int, repeat: int, seed: int = 1) -> dict[str, list[float]]:
    """Milliseconds of ``repeat`` calls of each query, after one untimed warm-up call."""
    sessions = make_session_factory(engine)
    rng = random.Random(seed)
    timings: dict[str, list[float]] = {}
    for name, query in dashboard_queries(iterations, rng).items():
        with sessions() as session:
            query(session)  # warm the connection pool and the DB cache once
        samples = []
        for _ in range(repeat):
            with sessions() as session:
                started = time.perf_counter()
                query(session)
                samples.append((time.perf_counter() - started) * 1000)
        timings[name] = samples
    return timings


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]
