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


def print_load_average() -> None:
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (timings are noisy when busy)")
