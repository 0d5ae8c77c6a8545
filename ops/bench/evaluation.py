"""Benchmark: seconds per instruct-checks item of greedy suite decoding at several batch sizes.

Run as ``python -m ops.bench.evaluation --model PATH`` (a checkpoint directory, e.g.
``kaizen-data/models/smollm2-135m-instruct``; default: the built-in tiny model). Answers the
first ``--items`` suite prompts greedily with ``--max-new-tokens``, once per batch size, in one
run, and prints seconds per item and the ratio to the first batch size. It also checks that the
answers do not depend on the batch size (they should not: left padding under an attention mask),
which is why ``eval.batch_size`` is not part of a suite result's config hash. Never fails on a
slow machine; it reports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import print_load_average
from policies.suites import load_instruct_checks
from workers.loading import user_prompt
from workers.runtime import ModelRuntime, configure_cpu_threads
from workers.tiny_model import build_tiny_model


def answer(runtime: ModelRuntime, prompts: list[str], batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    outputs = runtime.generate(prompts, num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    return time.perf_counter() - started, [samples[0].text for samples in outputs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in tiny model)")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    configure_cpu_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model or str(build_tiny_model(Path(scratch) / "tiny"))
        runtime = ModelRuntime.load(path)
        prompts = [user_prompt(runtime, item.prompt) for item in load_instruct_checks()[: args.items]]
        print_load_average()
        rows, reference = [], None
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            seconds, texts = answer(runtime, prompts, batch_size, args.max_new_tokens)
            same = reference is None or texts == reference
            reference = reference or texts
            rows.append((batch_size, seconds / len(prompts), same))
        base = rows[0][1]
        print(f"{len(prompts)} items, greedy, max_new_tokens={args.max_new_tokens}, model {path}")
        print(f"{'batch':>6} {'s/item':>8} {'vs first':>9}  answers as at the first batch size")
        for batch_size, per_item, same in rows:
            print(f"{batch_size:>6} {per_item:>8.3f} {per_item / base:>8.2f}x  {'yes' if same else 'NO'}")
        print_load_average()


if __name__ == "__main__":
    main()
