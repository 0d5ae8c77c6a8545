"""Benchmark: does the loop make the model better? Runs the demo and measures it, in one run.

    python -m ops.bench.improvement [--config ops/demo/improve.yaml] [--cycles 2] [--data-dir DIR]

From an empty data dir: `kaizen init` (converts SmolLM2-135M-Instruct), `kaizen run --cycles N`
with the demo config, then the champion and the initial model on instruct-checks (greedy, the
same items and max tokens; results cached per checkpoint and config). Prints both scores, the
difference with its paired-bootstrap 95% interval and the minimum detectable difference, the
promotions, and per iteration the truncation rate, self-generated share, constraint
satisfaction, pairs and the gate's decision, with the wall time of each phase. It reports what
it measured; it never fails because the model did not improve.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import print_load_average

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "demo" / "improve.yaml"
SUITE = "instruct-checks"
# eval.count_as_failing's names as the report words them.
ANSWER_WORDS = {"cut": "cut", "loops": "looping"}


def kaizen(*args: str) -> float:
    """Run one kaizen command (the console script next to this interpreter); its wall seconds."""
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("kaizen")), *args], check=True)
    return time.perf_counter() - started


def iteration_rows(settings) -> list[dict]:
    from sqlalchemy import select

    from daemon.db.engine import open_lineage
    from daemon.db.models import Iteration, StageRun
    from daemon.views import iteration_signals

    rows = []
    with open_lineage(settings)() as session:
        for iteration in session.scalars(select(Iteration).order_by(Iteration.id)):
            results = {r.stage: r.result for r in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration.id))}
            rows.append({"iteration": iteration.id, "decision": iteration.decision, **iteration_signals(results)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--data-dir", help="default: a fresh temporary directory")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="kaizen-improvement-")
    common = ["--config", args.config, "--data-dir", data_dir]
    print_load_average()
    timings = {"init": kaizen("init", *common), "cycles": kaizen("run", "--cycles", str(args.cycles), *common)}

    from daemon.config import load_settings
    from daemon.db.engine import open_lineage
    from policies.suites import counted_as_failing, paired_difference, scored_failing
    from workers.evaluation import compare_checkpoints

    settings = load_settings(args.config, data_dir=data_dir)
    started = time.perf_counter()
    champion, initial, paired = compare_checkpoints(settings, open_lineage(settings), "champion", "initial", SUITE)
    timings["final evaluation"] = time.perf_counter() - started
    rows = iteration_rows(settings)

    print(f"\nimprovement benchmark: {args.cycles} cycles, config {args.config}, data dir {data_dir}")
    for row in rows:
        gate = "; ".join(f"{s['suite']} {s['difference']:+.3f} [{s['lower']:+.3f}, {s['upper']:+.3f}]" for s in row["gate_suites"]) or "-"
        print(
            f"  iteration {row['iteration']}: {row['decision']}; truncation {row['truncation_rate']}, looping {row['looping_rate']}, "
            f"self-generated share {row['self_generated_share']}, satisfaction {row['satisfaction_rate']}, "
            f"pairs {row['trained_pairs']} (+{row['replayed_pairs']} replayed); gate {gate}"
        )
    promotions = sum(row["decision"] == "promoted" for row in rows)
    print(f"promotions: {promotions} of {len(rows)}; champion {champion.checkpoint_id}")
    scoring = f", a {' or '.join(ANSWER_WORDS[name] for name in settings.eval.count_as_failing)} answer failing" if settings.eval.count_as_failing else ""
    print(f"{SUITE} (n={paired.n}{scoring}): champion {paired.a_score:.3f}, initial {paired.b_score:.3f}")
    print(
        f"difference {paired.difference:+.3f}, paired-bootstrap 95% CI [{paired.low:+.3f}, {paired.high:+.3f}], "
        f"minimum detectable difference {paired.minimum_detectable:.3f}"
    )
    for failing in (["cut"], ["loops"], ["cut", "loops"]):
        strict = paired_difference(
            scored_failing(champion.items["items"], failing), scored_failing(initial.items["items"], failing),
            settings.eval.bootstrap_resamples, seed=settings.seed,
        )
        print(
            f"{SUITE} with a {' or '.join(ANSWER_WORDS[name] for name in failing)} answer failing: champion {strict.a_score:.3f}, initial {strict.b_score:.3f}, "
            f"difference {strict.difference:+.3f}, 95% CI [{strict.low:+.3f}, {strict.high:+.3f}]"
        )
    truncation = [r["truncation_rate"] for r in rows if r["truncation_rate"] is not None]
    share = [r["self_generated_share"] for r in rows if r["self_generated_share"] is not None]
    if truncation and share:
        print(f"mean truncation rate {sum(truncation) / len(truncation):.3f}; mean self-generated share {sum(share) / len(share):.3f}")
    print(f"champion answers cut at max tokens: {champion.items.get('truncation_rate', 0):.3f}; initial: {initial.items.get('truncation_rate', 0):.3f}")
    looping = [sum(counted_as_failing(item, ["loops"]) for item in row.items["items"]) for row in (champion, initial)]
    print(f"answers that loop (a line or phrase 3+ times): champion {looping[0]}, initial {looping[1]} of {paired.n}")
    print("lower bound > 0: " + ("yes, the champion is better" if paired.low > 0 else "NO, not shown to be better"))
    print("wall seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()))


if __name__ == "__main__":
    main()
