"""Benchmark: batched generation throughput vs one-at-a-time ``model.generate`` calls.

Run as ``python -m ops.bench.generation`` or ``python ops/bench/generation.py``. Builds the
built-in tiny model (or loads ``--model PATH``), then in one run measures generated tokens/s for
8 prompts x 4 samples through ``ModelRuntime.generate`` (one batch) and through 32 separate
single-sequence ``model.generate`` calls. Both sides generate exactly ``--max-new-tokens`` per
sequence (``min_new_tokens`` = ``max_new_tokens`` suppresses EOS). Prints a table and whether the
speed-up meets the target; it never fails on a miss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ops.bench._common import chat_prompts, measure, print_load_average
from workers.runtime import ModelRuntime
from workers.tiny_model import build_tiny_model

TARGET_SPEEDUP = 5.0


def run_batched(rt: ModelRuntime, prompts: list[str], samples: int, new_tokens: int, seed: int) -> int:
    out = rt.generate(
        prompts,
        num_samples=samples,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=seed,
        batch_size=len(prompts) * samples,
    )
    return sum(g.num_tokens for gens in out for g in gens)


def run_sequential(rt: ModelRuntime, prompts: list[str], samples: int, new_tokens: int, seed: int) -> int:
    torch.manual_seed(seed)
    total = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([rt.encode_prompt(prompt)], device=rt.device)
            for _ in range(samples):
                out = rt.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    top_k=0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=rt.pad_token_id,
                )
                total += out.shape[1] - ids.shape[1]
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir or hub id (default: build the tiny model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or str(build_tiny_model(Path(tmp) / "tiny"))
        rt = ModelRuntime.load(model_path, device=args.device)
        prompts = chat_prompts(rt, args.prompts)
        common = (rt, prompts, args.samples, args.max_new_tokens, 0)
        batched_s, batched_tok = measure(run_batched, args.repeats, *common)
        seq_s, seq_tok = measure(run_sequential, args.repeats, *common)

    batched_tps, seq_tps = batched_tok / batched_s, seq_tok / seq_s
    ratio = batched_tps / seq_tps
    print(f"model: {'tiny (built)' if not args.model else args.model}  device: {rt.device}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"workload: {len(prompts)} prompts x {args.samples} samples x {args.max_new_tokens} new tokens, "
          f"median of {args.repeats} after 1 warm-up")
    print_load_average()
    print(f"{'mode':<28}{'tokens':>8}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'batched (runtime.generate)':<28}{batched_tok:>8}{batched_s:>10.3f}{batched_tps:>12.1f}")
    print(f"{'sequential (1 seq/call)':<28}{seq_tok:>8}{seq_s:>10.3f}{seq_tps:>12.1f}")
    verdict = "meets" if ratio >= TARGET_SPEEDUP else "does NOT meet"
    print(f"speed-up: {ratio:.1f}x  ({verdict} the {TARGET_SPEEDUP:.0f}x target)")


if __name__ == "__main__":
    main()
