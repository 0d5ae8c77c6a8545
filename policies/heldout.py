"""The gate's held-out prompts: a fixed slice of the seed set that training never sees."""

from __future__ import annotations

import random

HELDOUT_SPLIT_SEED = 20261123


def split_seed_prompts(seed_prompts: list[str], heldout_count: int) -> tuple[list[str], list[str]]:
    """Return (training seeds, held-out prompts); the split is the same in every iteration."""
    if heldout_count >= len(seed_prompts):
        raise ValueError(f"gate.heldout_prompts={heldout_count} must be below the {len(seed_prompts)} seed prompts")
    order = list(range(len(seed_prompts)))
    random.Random(HELDOUT_SPLIT_SEED).shuffle(order)
    heldout_indices = set(order[:heldout_count])
    train = [p for i, p in enumerate(seed_prompts) if i not in heldout_indices]
    heldout = [seed_prompts[i] for i in sorted(heldout_indices)]
    return train, heldout
