"""Many contexts that open with the same tokens: the shared prefix is computed once.

Every judgment of a call starts with the same rubric (about 70% of a judge context), every
implicit-judge or URIAL prompt with the same chat-template turn or preamble. Those shared tokens'
keys and values are computed in one batch-1 forward pass and copied to each row of every chunk;
each row then runs only its own suffix. The suffixes are left-padded after the prefix, so a
row is ``[prefix][pad…][suffix]``: the attention mask hides the pads, and the suffix's positions
continue from the prefix's, which makes the logits the ones an unshared pass gives (up to float
rounding, since the matrix shapes differ).

The prefix is cut in token space, from the contexts' own ids, so tokenisation never changes.
Scoring (workers/scoring.py) and static generation (workers/generation.py) share one prefix per
call; the batch engine (workers/batch_engine.py), which prefills prompts as they arrive, keeps
recent prompts' caches in a :class:`PrefixMemory`.
"""

from __future__ import annotations

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
        return DynamicCache(ddp_cache_data=[
            (layer.keys.repeat_interleave(rows, dim=0), layer.values.repeat_interleave(rows, dim=0)) for layer in self.cache.layers
        ])


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


def _plain(cache: Any) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def encode_shared_prefix(
    model: Any, contexts: Sequence[Sequence[int]], device: torch.device, forward_params: set[str], length: int | None = None
) -> SharedPrefix | None:
    """The cache of the contexts' first ``length`` tokens (default: all they share but the last),
    or None where that is too short to pay or the model's forward cannot reuse a cache."""
    length = shared_prefix_length(contexts) if length is None else length
    argument = cache_argument(forward_params)
    if length < MIN_SHARED_PREFIX or argument is None:
        return None
    return encode_prefix(model, contexts[0][:length], device, argument)


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
    if not _plain(cache):
        return None
    return SharedPrefix(length=len(ids), cache=cache, argument=argument)


def forward_after_prefix(
    model: Any, prefix: SharedPrefix, contexts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device, keep_last: int
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model's output on each context's suffix after a copy of the prefix's cache, the suffix
    ids it ran on, and the attention mask over prefix and suffix (the output's cache has both, so a
    decoder continues from there)."""
    suffix_ids, suffix_mask = left_pad([ids[prefix.length :] for ids in contexts], pad_token_id, device)
    rows = len(contexts)
    prefix_mask = torch.ones((rows, prefix.length), dtype=suffix_mask.dtype, device=device)
    mask = torch.cat([prefix_mask, suffix_mask], dim=-1)
    # Real suffix tokens continue at position prefix.length; the pads between are masked out.
    positions = prefix.length + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=keep_last,
        **{prefix.argument: prefix.cache_for(rows)},
    )
    return out, suffix_ids, mask


def logits_after_prefix(
    model: Any, prefix: SharedPrefix, contexts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device, keep_last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of each context's last ``keep_last`` positions, and the suffix ids they were run on.

    Like a left-padded batch, every row ends in the last column, so column ``-k`` of the logits
    and of the ids is the same token of each row as in an unshared pass. ``keep_last`` must not
    exceed the longest suffix; in a row with a shorter suffix the extra columns are padding, whose
    logits mean nothing (``shared_prefix_length`` leaves every row at least one token).
    """
    out, suffix_ids, _ = forward_after_prefix(model, prefix, contexts, pad_token_id, device, keep_last)
    return out.logits[:, -keep_last:, :].float(), suffix_ids


class PrefixMemory:
    """Recent prompts' keys and values, for a decoder that prefills prompts as they arrive (the
    server's batch engine, where URIAL requests share the preamble and chat requests a system turn).

    :meth:`prefix_for` gives the cache a group of prompts can prefill on: the longest opening of at
    least :data:`MIN_SHARED_PREFIX` tokens they all share with a remembered prompt (cut to that
    length), or their own shared opening, encoded once and remembered, where that saves more (the
    samples of one prompt share all of it). A group that gets None is prefilled whole, and
    :meth:`remember` keeps its first prompt. At most ``capacity`` prompts are
    kept (batch 1 each, on the model's device), the least recently matched dropped first.
    """

    def __init__(self, model: Any, device: torch.device, argument: str, capacity: int = 4) -> None:
        self.model, self.device, self.argument, self.capacity = model, device, argument, capacity
        self._entries: list[tuple[list[int], DynamicCache]] = []  # least recently used first
        self.hits = 0  # groups that prefilled on a remembered prompt

    def prefix_for(self, prompts: Sequence[Sequence[int]]) -> SharedPrefix | None:
        limit = min(len(ids) for ids in prompts) - 1  # every prompt keeps its last token, whose logits are sampled
        lengths = [min(common_prefix_length([ids, *prompts]), limit) for ids, _ in self._entries]
        best = max(range(len(lengths)), key=lengths.__getitem__, default=None)
        remembered = lengths[best] if best is not None else 0
        own = shared_prefix_length(prompts)  # e.g. the samples of one prompt share all of it
        # Encoding their own opening costs ``own`` tokens once and saves ``own - remembered`` per row.
        if own >= MIN_SHARED_PREFIX and own < len(prompts) * (own - remembered):
            prefix = encode_prefix(self.model, prompts[0][:own], self.device, self.argument)
            if prefix is not None:
                self._keep(list(prompts[0][:own]), prefix.cache)
            return prefix
        if best is None or remembered < MIN_SHARED_PREFIX:
            return None
        ids, cache = self._entries.pop(best)
        self._entries.append((ids, cache))
        self.hits += 1
        cut = DynamicCache(ddp_cache_data=[(layer.keys[..., :remembered, :], layer.values[..., :remembered, :]) for layer in cache.layers])
        return SharedPrefix(length=remembered, cache=cut, argument=self.argument)

    def remember(self, ids: Sequence[int], cache: Any, row: int) -> None:
        """Keep prompt ``ids``, row ``row`` of a left-padded batch's ``cache`` (its last columns)."""
        if len(ids) <= MIN_SHARED_PREFIX or not _plain(cache):
            return
        start = cache.layers[0].keys.shape[-2] - len(ids)
        # Cloned: a view would keep the whole batch's tensors alive.
        layers = [(layer.keys[row : row + 1, :, start:, :].clone(), layer.values[row : row + 1, :, start:, :].clone()) for layer in cache.layers]
        self._keep(list(ids), DynamicCache(ddp_cache_data=layers))

    def _keep(self, ids: list[int], cache: DynamicCache) -> None:
        self._entries.append((ids, cache))
        del self._entries[: -self.capacity]
