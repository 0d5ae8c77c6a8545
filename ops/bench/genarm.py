"""Benchmark: GenARM-guided decoding time per token, as a ratio to plain decoding in the same run.

Run as ``python -m ops.bench.genarm`` or ``python ops/bench/genarm.py``. Builds three models that
share one locally trained tokenizer: a base (``--hidden`` wide, ``--layers`` deep; 256 x 4 by
default) and two reward models, one the base's size and one with half its layers (half the
transformer weights; the embeddings are the same size). Reward models are left untrained: the
work per token does not depend on the weights. Each mode decodes exactly ``--max-new-tokens`` per
sequence (``min_new_tokens`` suppresses EOS) through ``ModelRuntime.generate``, guided modes with
the same ``RewardGuidanceProcessor`` that ``guided_generate`` installs, for a single prompt (what
one server request decodes) and for a batch. Prints a table; it never fails on a slow result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import AutoTokenizer

from ops.bench._common import chat_prompts, measure, print_load_average
from workers.genarm import RewardGuidanceProcessor
from workers.runtime import ModelRuntime
from workers.tiny_model import build_tiny_model

BETA = 1.0


def build_models(root: Path, hidden: int, layers: int, device: str | None) -> tuple[ModelRuntime, dict[str, ModelRuntime]]:
    base_dir = build_tiny_model(root / "base", hidden_size=hidden, num_layers=layers, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reward_dirs = {
        "same size": build_tiny_model(root / "arm-same", hidden_size=hidden, num_layers=layers, seed=1),
        "half size": build_tiny_model(root / "arm-half", hidden_size=hidden, num_layers=max(1, layers // 2), seed=2),
    }
    for path in reward_dirs.values():
        tokenizer.save_pretrained(path)  # one tokenizer for all: the weak-to-strong requirement
    base = ModelRuntime.load(str(base_dir), device=device)
    return base, {name: ModelRuntime.load(str(path), device=device) for name, path in reward_dirs.items()}


def decode(base: ModelRuntime, reward: ModelRuntime | None, prompts: list[str], new_tokens: int) -> int:
    make = None
    if reward is not None:
        def make(ids: torch.Tensor, mask: torch.Tensor) -> list[RewardGuidanceProcessor]:
            return [RewardGuidanceProcessor([reward.model], [1.0], BETA, ids, mask)]
    out = base.generate(
        prompts, num_samples=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0, top_p=0.95,
        seed=0, batch_size=len(prompts), logits_processors=make,
    )
    return sum(g[0].num_tokens for g in out)


def params(runtime: ModelRuntime) -> str:
    return f"{sum(p.numel() for p in runtime.model.parameters()) / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batched workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest on a busy CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base, rewards = build_models(Path(tmp), args.hidden, args.layers, args.device)
        prompts = chat_prompts(base, args.batch)
        rows = []
        for label, batch in (("1 prompt", prompts[:1]), (f"{len(prompts)} prompts", prompts)):
            plain_s, plain_tok = measure(decode, args.repeats, base, None, batch, args.max_new_tokens)
            rows.append((label, "plain", plain_s, plain_tok, 1.0))
            for name, reward in rewards.items():
                seconds, tokens = measure(decode, args.repeats, base, reward, batch, args.max_new_tokens)
                rows.append((label, f"genarm, reward {name}", seconds, tokens, (seconds / tokens) / (plain_s / plain_tok)))

    print(f"device: {base.device}  threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"base: {args.layers} layers x {args.hidden} hidden ({params(base)} params); reward models: "
          + ", ".join(f"{name} {params(rt)}" for name, rt in rewards.items()))
    print(f"workload: {args.max_new_tokens} new tokens per sequence, median of {args.repeats} after 1 warm-up")
    print_load_average()
    print(f"{'batch':<12}{'mode':<26}{'tokens':>8}{'seconds':>10}{'ms/token':>10}{'vs plain':>10}")
    for label, mode, seconds, tokens, ratio in rows:
        print(f"{label:<12}{mode:<26}{tokens:>8}{seconds:>10.3f}{1000 * seconds / tokens:>10.2f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
