"""Soak benchmark: K tiny cycles back to back in production mode, watching for slow-downs and leaks.

Real services and processes: lineage in PostgreSQL (a scratch database, dropped afterwards),
Celery over Redis (a private redis-server on a free port), one real `kaizen worker` process.
The daemon side is the daemon's own code (run_cycle + CeleryDispatcher) in this process.

Prints, per cycle: wall time, the sum of stage compute times, the orchestration overhead
(wall - compute) and its share of the cycle, and the worker's resident memory (its Celery
parent plus the pool process that holds the models) at the end of the cycle and at its peak.
Then the RSS trend after the first cycle (which loads torch and the models): a leak shows as a
steady climb of MB per cycle. Nothing is asserted; compare numbers within one run.

    python -m ops.bench.soak [--cycles 10] [--database-url URL] [--broker-url URL] [--max-steps 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil
import psycopg
import yaml

from daemon.bootstrap import initialise
from daemon.config import load_settings
from daemon.cycle import CycleReport, run_cycle
from daemon.dispatch import CeleryDispatcher
from daemon.logs import configure_logging
from ops.services import PrivateRedis

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
MB = 1024 * 1024


def tiny_cycle_config(data_dir: Path, model_dir: Path, database_url: str, broker_url: str, max_steps: int) -> dict:
    return {
        "data_dir": str(data_dir),
        "database_url": database_url,
        "model": {"path": str(model_dir)},
        "log_format": "json",
        "log_level": "warning",
        "worker": {"mode": "external", "broker_url": broker_url, "stage_timeout_seconds": 1800},
        "generation": {"max_new_tokens": 12, "batch_size": 32},
        "prompts": {"per_cycle": 3, "max_rounds": 1},
        "respond": {"num_samples": 2},
        "judge": {"num_samples": 1, "max_new_tokens": 12},
        "training": {"max_steps": max_steps, "batch_size": 2, "max_length": 128},
        "gate": {"heldout_prompts": 4, "min_comparisons": 2},
    }


@contextmanager
def scratch_postgres() -> Iterator[str]:
    name = f"kaizen_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of the soak's own on a free port, killed afterwards: never a shared Redis DB."""
    server = PrivateRedis(workdir / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@dataclass
class RssSampler:
    """Samples the worker's RSS (Celery parent + pool processes) every ``interval`` seconds."""

    pid: int
    interval: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> int:
        try:
            parent = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic(), self.rss()))

    def stop(self) -> None:
        self._stop.set()

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


def start_worker(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "worker", "--config", str(config_path), "--queues", "gpu,cpu"],
        env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def rss_trend(values_mb: list[float]) -> float:
    """Least-squares slope in MB per cycle (0 for fewer than two points)."""
    if len(values_mb) < 2:
        return 0.0
    xs = list(range(len(values_mb)))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values_mb)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values_mb)) / denominator


def soak(cycles: int, database_url: str, broker_url: str, max_steps: int, workdir: Path) -> None:
    from policies.self_instruct import load_seed_prompts
    from workers.tiny_model import build_tiny_model

    model_dir = build_tiny_model(workdir / "model", extra_corpus=load_seed_prompts())
    config = tiny_cycle_config(workdir / "data", model_dir, database_url, broker_url, max_steps)
    config_path = workdir / "kaizen.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    sessions = initialise(settings)
    worker = start_worker(config_path, workdir / "worker.log")
    sampler = RssSampler(worker.pid)
    sampler.start()
    dispatcher = CeleryDispatcher(settings, sessions)
    rows: list[tuple[CycleReport, float, float]] = []
    header = f"{'cycle':>5}{'wall s':>9}{'compute s':>11}{'overhead s':>12}{'overhead':>10}{'RSS end MB':>12}{'RSS peak MB':>13}"
    print(header)
    try:
        for index in range(1, cycles + 1):
            began = time.monotonic()
            report = run_cycle(sessions, settings, dispatcher)
            ended = time.monotonic()
            end_rss, peak = sampler.rss() / MB, sampler.peak_between(began, ended) / MB
            rows.append((report, end_rss, peak))
            compute = sum(report.stage_seconds.values())
            print(
                f"{index:>5}{report.wall_seconds:>9.2f}{compute:>11.2f}{report.orchestration_seconds:>12.2f}"
                f"{report.orchestration_seconds / report.wall_seconds:>10.1%}{end_rss:>12.1f}{max(peak, end_rss):>13.1f}",
                flush=True,
            )
    finally:
        sampler.stop()
        stop_worker(worker)
    summarise(rows, sampler, dispatcher.redispatches)


def summarise(rows: list[tuple[CycleReport, float, float]], sampler: RssSampler, redispatches: int) -> None:
    if not rows:
        return
    steady = rows[1:] or rows
    ratios = [r.orchestration_seconds / r.wall_seconds for r, _, _ in steady]
    trend = rss_trend([end for _, end, _ in steady])
    print()
    print(f"cycles after the first: median wall {statistics.median(r.wall_seconds for r, _, _ in steady):.2f} s, "
          f"median overhead {statistics.median(ratios):.1%} of the cycle")
    print(f"worker RSS after the first cycle: {steady[0][1]:.1f} MB -> {steady[-1][1]:.1f} MB, trend {trend:+.2f} MB/cycle "
          f"({'no growth' if abs(trend) < 0.01 * steady[0][1] else 'GROWING: look for a leak'} at a 1%/cycle threshold)")
    print(f"stages sent again by the daemon (lost or unclaimed messages): {redispatches}")
    if sampler.samples:
        start = sampler.samples[0][0]
        every = max(1, len(sampler.samples) // 20)
        series = ", ".join(f"{t - start:.0f}s:{rss / MB:.0f}" for t, rss in sampler.samples[::every])
        print(f"worker RSS over time (s:MB): {series}")
    print("overhead = cycle wall time - sum of stage compute times (dispatch, polling, queueing, model loads outside compute)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--database-url", help="PostgreSQL URL (default: a scratch database on 127.0.0.1, dropped afterwards)")
    parser.add_argument("--broker-url", help="Redis URL (default: a private redis-server on a free port, killed afterwards)")
    parser.add_argument("--max-steps", type=int, default=2, help="DPO steps per cycle")
    args = parser.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory(prefix="kaizen-soak-") as tmp:
        with scratch_postgres() if args.database_url is None else _given(args.database_url) as database_url:
            with scratch_redis(Path(tmp)) if args.broker_url is None else _given(args.broker_url) as broker_url:
                soak(args.cycles, database_url, broker_url, args.max_steps, Path(tmp))


@contextmanager
def _given(value: str) -> Iterator[str]:
    yield value


if __name__ == "__main__":
    main()
