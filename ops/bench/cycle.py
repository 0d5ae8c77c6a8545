"""A cycle's orchestration overhead: wall time minus the sum of stage compute times.

Runs cycles on the tiny model in a throw-away data dir, once with stages in-process (eager)
and once through a local Celery worker over the SQLite broker, and prints the overhead as a
fraction of the cycle. Nothing is asserted; compare the ratios measured in one run.

    python -m ops.bench.cycle [--cycles 2] [--modes eager,local]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from daemon.bootstrap import initialise
from daemon.config import load_settings
from daemon.cycle import run_cycle
from daemon.dispatch import LocalWorker, make_dispatcher
from daemon.logs import configure_logging

SMALL = {
    "generation": {"max_new_tokens": 24},
    "prompts": {"per_cycle": 4, "max_rounds": 1},
    "respond": {"num_samples": 2},
    "judge": {"num_samples": 1, "max_new_tokens": 24},
    "training": {"max_steps": 4},
    "gate": {"heldout_prompts": 4, "min_comparisons": 2},
}


def bench_mode(mode: str, cycles: int, root: Path) -> list[tuple[float, float]]:
    settings = load_settings(None, data_dir=root / mode, worker={"mode": mode}, log_level="warning", **SMALL)
    sessions = initialise(settings)
    worker = LocalWorker(settings) if mode == "local" else None
    if worker:
        worker.start()
    try:
        dispatcher = make_dispatcher(settings, sessions)
        reports = [run_cycle(sessions, settings, dispatcher) for _ in range(cycles)]
    finally:
        if worker:
            worker.stop()
    return [(r.wall_seconds, r.orchestration_seconds) for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--modes", default="eager,local")
    args = parser.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'mode':<8}{'cycle':>6}{'wall s':>10}{'overhead s':>12}{'overhead/cycle':>16}")
        for mode in args.modes.split(","):
            for index, (wall, overhead) in enumerate(bench_mode(mode, args.cycles, Path(tmp)), start=1):
                print(f"{mode:<8}{index:>6}{wall:>10.2f}{overhead:>12.3f}{overhead / wall:>16.1%}")
    print("overhead = cycle wall time - sum of stage compute times (model loads in a fresh worker count as compute)")


if __name__ == "__main__":
    main()
