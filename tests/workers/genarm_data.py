"""Preference data the GenARM tests train reward models on."""

from __future__ import annotations

import random

from policies.self_instruct import load_seed_prompts
from workers.training import PreferenceExample

FILLER = "the sea is clear and cold we like to walk along the shore every day with some people from the town".split()


def marker_pairs(marker: str, instead: str, *, n: int = 24, seed: int = 0) -> list[PreferenceExample]:
    """Chosen answers say ``marker`` where the otherwise identical rejected ones say ``instead``."""
    rng = random.Random(seed)
    prompts = load_seed_prompts()
    examples = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(10)]
        spots = rng.sample(range(len(words)), 3)
        chosen = [marker if k in spots else w for k, w in enumerate(words)]
        rejected = [instead if k in spots else w for k, w in enumerate(words)]
        examples.append(PreferenceExample(prompt=prompts[i % len(prompts)], chosen=" ".join(chosen), rejected=" ".join(rejected)))
    return examples
