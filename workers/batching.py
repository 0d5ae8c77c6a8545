"""How token sequences become model batches: chunking, left padding and shared prefixes.

Generation and scoring both pad by hand (never ``tokenizer(..., padding=True)``) so that every
path sees exactly the ids :meth:`workers.runtime.ModelRuntime.context_ids` produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch; units are prompts (or pairs)."""


def chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``seq`` in consecutive slices of at most ``size`` items (at least one item per slice)."""
    size = max(1, size)
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def chunks_by_weight(weights: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive index groups whose weights sum to at most ``limit`` (a heavier item is a group alone).

    Generation packs prompts by their sample counts, so a prompt's samples share one batch.
    """
    groups: list[list[int]] = []
    total = 0
    for index, weight in enumerate(weights):
        if not groups or total + weight > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += weight
    return groups


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every sequence right-aligned, so all rows end together."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares."""
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length
