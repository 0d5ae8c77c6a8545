"""How fast are the dashboard's queries on a big lineage? SQLite and PostgreSQL.

Seeds a synthetic lineage shaped like the real one (ops.bench.lineage_seed: checkpoints,
iterations with their stage runs and results, prompts, responses, judgments, pairs, gate
evaluations, events) through the migrated schema, then times each read the dashboard and
/metrics make (ops.bench.dashboard_queries), in a fresh session per call, and prints p50/p95 per
query and backend. Target: p95 < 50 ms.

    .venv/bin/python -m ops.bench.dashboard                      # 10,000 iterations, 1,000,000 judgments
    .venv/bin/python -m ops.bench.dashboard --iterations 500 --judgments 50000 --backends sqlite

PostgreSQL: --postgres-url (default postgresql+psycopg://postgres@127.0.0.1:5432/kaizen_bench); the
database is dropped and created again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from daemon.db.engine import make_engine, make_session_factory, upgrade_to_head
from daemon.db.models import ChampionPointer, Judgment
from ops.bench.dashboard_queries import percentile, time_queries
from ops.bench.lineage_seed import seed_lineage

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/kaizen_bench"
TARGET_P95_MS = 50.0
BACKENDS = ("sqlite", "postgresql")

Timings = dict[str, list[float]]


# ---------------------------------------------------------------- backends


def _postgres_fresh(url: str) -> str:
    parsed = make_url(url)
    admin = make_engine(parsed.set(database="postgres").render_as_string(hide_password=False)).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()
    return url


def _judgment_count(engine: Engine) -> int:
    with make_session_factory(engine)() as session:
        return session.scalar(select(func.count()).select_from(Judgment)) or 0


def _seed(engine: Engine, args: argparse.Namespace) -> None:
    """Seed the lineage and check it landed: every judgment, and the champion the seeding chose."""

    def progress(done: int) -> None:
        if done % 2000 < 250 or done == args.iterations:
            print(f"  seeded {done}/{args.iterations} iterations", flush=True)

    per_iteration = max(1, args.judgments // args.iterations)
    summary = seed_lineage(engine, args.iterations, per_iteration, seed=args.seed, progress=progress)
    print(f"  seeded in {summary.seconds:.0f}s: " + ", ".join(f"{k} {v:,}" for k, v in summary.rows.items()), flush=True)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))  # what autovacuum does soon after a bulk load
    assert _judgment_count(engine) == summary.judgments
    with make_session_factory(engine)() as session:
        assert session.scalar(select(ChampionPointer.checkpoint_id)) == summary.champion


def run_backend(name: str, url: str, args: argparse.Namespace) -> Timings:
    print(f"\n[{name}] {url}", flush=True)
    upgrade_to_head(url)
    engine = make_engine(url)
    if args.reuse:
        print(f"  reusing {_judgment_count(engine):,} judgments", flush=True)
    else:
        _seed(engine, args)
    timings = time_queries(engine, args.iterations, args.repeat)
    engine.dispose()
    return timings


def _backend_url(backend: str, args: argparse.Namespace, scratch: Path) -> str:
    """Where ``backend`` is benchmarked; a fresh (emptied) database unless --reuse."""
    if backend == "sqlite":
        path = args.sqlite_path or scratch / "lineage.db"
        if not args.reuse:
            path.unlink(missing_ok=True)
        return f"sqlite:///{path}"
    return args.postgres_url if args.reuse else _postgres_fresh(args.postgres_url)


# ---------------------------------------------------------------- the report


def report(results: dict[str, Timings]) -> bool:
    """Print p50/p95 per backend and query; whether every p95 is under the target."""
    ok = True
    width = max(len(q) for timings in results.values() for q in timings)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    # Timings on a shared machine move with its load; say what it was.
    print(f"\n{os.cpu_count()} CPUs, load average {load}")
    print(f"{'backend':<11} {'query':<{width}} {'p50 ms':>8} {'p95 ms':>8}  target p95 < {TARGET_P95_MS:.0f} ms")
    for backend, timings in results.items():
        for query, samples in timings.items():
            p50, p95 = percentile(samples, 50), percentile(samples, 95)
            verdict = "ok" if p95 < TARGET_P95_MS else "SLOW"
            ok &= p95 < TARGET_P95_MS
            print(f"{backend:<11} {query:<{width}} {p50:>8.1f} {p95:>8.1f}  {verdict}")
    return ok


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--judgments", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per query")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--sqlite-path", type=Path, default=None, help="default: a temporary file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="time the databases a previous run seeded (needs --sqlite-path)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    for backend in backends:  # before any seeding, so a typo costs nothing
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}: sqlite or postgresql")
    results: dict[str, Timings] = {}
    with tempfile.TemporaryDirectory(prefix="kaizen-bench-") as scratch:
        for backend in backends:
            results[backend] = run_backend(backend, _backend_url(backend, args, Path(scratch)), args)
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
