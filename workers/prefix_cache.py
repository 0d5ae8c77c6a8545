"""Scoring many contexts that open with the same tokens: the shared prefix is computed once.

Every judgment of a call starts with the same rubric (about 70% of a judge context), so its
keys and values are computed in one batch-1 forward pass and copied to each row of every chunk;
each row then runs only its own suffix. The suffixes are left-padded after the prefix, so a
row is ``[prefix][pad…][suffix]``: the attention mask hides the pads, and the suffix's positions
continue from the prefix's, which makes the logits the ones an unshared pass gives (up to float
rounding, since the matrix shapes differ).

The prefix is cut in token space, from the contexts' own ids, so tokenisation never changes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.batching import common_prefix_length, left_pad

MIN_SHARED_PREFIX = 16
"""Shorter shared prefixes are not worth the extra forward pass and the cache copies."""


@dataclass(frozen=True)
class SharedPrefix:
    """The key/value cache (batch 1) of the first ``length`` tokens every context shares."""

    length: int
    cache: DynamicCache
    argument: str  # the forward's keyword for it, see cache_argument

    def cache_for(self, rows: int) -> DynamicCache:
        """A copy for a batch of ``rows``; the forward pass appends to it, so each chunk gets its own."""
        expanded = copy.deepcopy(self.cache)
        expanded.batch_repeat_interleave(rows)
        return expanded


def cache_argument(forward_params: set[str]) -> str | None:
    """The forward's keyword for a KV cache, or None where prefix reuse cannot work.

    transformers renamed ``past_key_values`` to ``cache`` within 5.x (the old name is deprecated),
    so the name is read from the signature. Reuse also needs explicit positions (for the padded
    suffixes) and ``logits_to_keep``.
    """
    if not {"position_ids", "logits_to_keep"} <= forward_params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in forward_params), None)


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """The tokens all ``contexts`` share, less one: every row must keep a token whose logits are read."""
    if len(contexts) < 2:
        return 0
    return min(common_prefix_length(contexts), min(len(ids) for ids in contexts) - 1)


def encode_prefix(model: Any, ids: Sequence[int], device: torch.device, argument: str) -> SharedPrefix | None:
    """The prefix's cache, or None where the model's cache is not a plain growing one.

    Sliding-window or quantized layers drop or change old entries, so a copied cache would not
    equal an unshared pass; those models score without reuse.
    """
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(len(ids), device=device).unsqueeze(0),
        use_cache=True,
        logits_to_keep=1,
        **{argument: DynamicCache()},
    )
    cache = getattr(out, argument)
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return SharedPrefix(length=len(ids), cache=cache, argument=argument)


def logits_after_prefix(
    model: Any, prefix: SharedPrefix, contexts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device, keep_last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of each context's last ``keep_last`` positions, and the suffix ids they were run on.

    Like a left-padded batch, every row ends in the last column, so column ``-k`` of the logits
    and of the ids is the same token of each row as in an unshared pass. ``keep_last`` must not
    exceed the shortest suffix (``shared_prefix_length`` leaves at least one token).
    """
    suffix_ids, suffix_mask = left_pad([ids[prefix.length :] for ids in contexts], pad_token_id, device)
    rows = len(contexts)
    prefix_mask = torch.ones((rows, prefix.length), dtype=suffix_mask.dtype, device=device)
    # Real suffix tokens continue at position prefix.length; the pads between are masked out.
    positions = prefix.length + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=suffix_ids,
        attention_mask=torch.cat([prefix_mask, suffix_mask], dim=-1),
        position_ids=positions,
        use_cache=True,
        logits_to_keep=keep_last,
        **{prefix.argument: prefix.cache_for(rows)},
    )
    return out.logits[:, -keep_last:, :].float(), suffix_ids
