"""Continuous batching for a Hugging Face causal LM: one thread owns the model, new sequences
join the decoding batch between steps, finished or cancelled ones leave it.

The batch shares one left-padded KV cache (``DynamicCache``, one row per sequence). Admission
prefills the new prompts together, then pads the older rows' or the new rows' keys on the left to
a common length and stacks them; every row carries its own position ids and attention-mask row,
so padding never changes a row's result. Eviction selects the remaining rows and drops columns
that are padding for all of them. Sequences report through callbacks from the engine thread:
``on_token(piece, token)`` for every generated token (``token`` None for text released only at the
end), then ``on_finish(reason, num_tokens)`` or ``on_error(error)`` once.
"""

from __future__ import annotations

import inspect
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import DynamicCache

from policies.end_ramp import EndRamp
from workers import sampling
from workers.detokenize import TextAssembler
from workers.engine_thread import EngineThread
from workers.prefix_cache import PrefixMemory, cache_argument, forward_after_prefix

if TYPE_CHECKING:
    from workers.genarm import RewardGuidance

RowProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""HF-style ``(input_ids [1, L], scores [1, V]) -> scores`` for one sequence (GenARM guidance,
grammar masks); called once per step with the prompt plus every token generated so far."""


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    logprob: float | None = None  # the model's own log-probability (before temperature, penalties, masks)
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    stops: tuple[str, ...] = ()
    # Training samples only (respond.end_bonus): a rising end-of-turn bonus over max_tokens' last part.
    end_ramp: EndRamp | None = None


class SequenceListener(Protocol):
    def on_token(self, piece: str, token: TokenInfo | None) -> None: ...  # None: text released at the end
    def on_finish(self, reason: str, num_tokens: int) -> None: ...
    def on_error(self, error: BaseException) -> None: ...


@dataclass
class SequenceRequest:
    prompt_ids: list[int]
    spec: SamplingSpec
    listener: SequenceListener
    processors: Sequence[RowProcessor] = ()
    # GenARM guidance for an engine that applies it itself (the vLLM one) instead of ``processors``.
    reward_guidance: RewardGuidance | None = None
    # The JSON schema for an engine that constrains decoding itself (vLLM's structured outputs)
    # instead of a grammar in ``processors``.
    json_schema: dict[str, Any] | None = None
    finalize: Callable[[str], str] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The ids generated so far (EOS included), appended by the engine thread; complete once
    # on_finish has been called.
    generated: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """One sequence in the batch: its tokens, random stream, text state and counts."""

    def __init__(self, request: SequenceRequest, tokenizer: Any, vocab: int, device: torch.device, eos_ids: Sequence[int] = ()) -> None:
        self.request = request
        self.eos_ids = eos_ids
        self.spec = request.spec
        self.generated: list[int] = request.generated
        self.position = len(request.prompt_ids)
        self.generator = sampling.new_generator(self.spec.seed)
        self.text = TextAssembler(tokenizer, list(self.spec.stops), request.finalize)
        penalised = self.spec.presence_penalty or self.spec.frequency_penalty
        self.counts = torch.zeros(vocab, device=device) if penalised else None
        self.finish_reason: str | None = None

    def adjust(self, scores: torch.Tensor) -> torch.Tensor:
        """Penalties, logit bias, the end ramp and the sequence's processors, applied to its [1, V] scores."""
        if self.spec.end_ramp is not None:
            sampling.add_end_bonus(scores, self.eos_ids, self.spec.end_ramp.bonus_at(len(self.generated), self.spec.max_tokens))
        if self.counts is not None:
            scores = sampling.apply_penalties(scores, self.counts, self.spec.presence_penalty, self.spec.frequency_penalty)
        for token, bias in self.spec.logit_bias:
            if token < scores.shape[-1]:
                scores[..., token] += bias
        if self.request.processors:
            ids = torch.tensor([self.request.prompt_ids + self.generated], dtype=torch.long, device=scores.device)
            for processor in self.request.processors:
                scores = processor(ids, scores)
        return scores

    @property
    def needs_adjusting(self) -> bool:
        return self.counts is not None or bool(self.spec.logit_bias) or bool(self.request.processors) or self.spec.end_ramp is not None


class SequenceEngine(EngineThread[SequenceRequest]):
    """What the server drives: sequences submitted from any thread and prompt scoring (echo,
    prompt logprobs) on the engine thread. :class:`BatchEngine` on HF, ``VllmBatchEngine`` on vLLM."""

    @abstractmethod
    def score_prompt(self, prompt_ids: list[int], top: int) -> list[TokenInfo]:
        """Each prompt token's log-prob given the tokens before it (None for the first), with the
        ``top`` most likely tokens at each position; engine thread only."""


class BatchEngine(SequenceEngine):
    """The decoding loop of one loaded model. ``submit`` is thread-safe; the model is only touched
    by the engine's own thread."""

    thread_prefix = "batch"

    def __init__(
        self, runtime: Any, *, max_batch_size: int = 16, max_waiting: int = 256, name: str = "engine", admit_min: int = 1,
        share_prefix: bool = True,
    ) -> None:
        """``admit_min``: while rows are decoding, waiting sequences join only once at least this
        many slots are free (or every waiting one fits). Each admission re-stacks the whole KV
        cache, so on a CPU, where a step costs in proportion to its rows, admitting in groups
        costs little decode and saves copies; the server admits at once (1) for latency.

        ``share_prefix``: admitted prompts that open like a recent one (a URIAL preamble, a system
        turn) prefill only the rest, on a copy of its keys and values (:class:`PrefixMemory`);
        False prefills every prompt whole, the reference the reuse is tested against."""
        super().__init__(max_batch_size=max_batch_size, max_waiting=max_waiting, name=name, admit_min=admit_min)
        self.runtime = runtime
        self.model, self.tokenizer = runtime.model, runtime.tokenizer
        self.device = runtime.device
        self.eos = set(runtime.eos_token_ids)
        self.eos_ids = sorted(self.eos)  # for indexing logits (the end ramp): built once, not per admission
        self.step_log: deque[int] = deque(maxlen=100_000)  # batch size of each decode step, newest last
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self.pad_token_id = runtime.pad_token_id
        self.max_positions = int(getattr(runtime.model.config, "max_position_embeddings", 0) or 0)
        params = inspect.signature(runtime.model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params
        # transformers 5.2x renamed past_key_values to cache (the old name warns on every call).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        argument = cache_argument(set(params)) if share_prefix else None
        self.prefixes = PrefixMemory(self.model, self.device, argument) if argument is not None else None

    # ------------------------------------------------------------------ public, any thread

    def score_prompt(self, prompt_ids: list[int], top: int) -> list[TokenInfo]:
        """Each prompt token's log-prob given the tokens before it (None for the first); engine thread only."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, use_cache=False).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = [TokenInfo(prompt_ids[0])]
        for position in range(1, len(prompt_ids)):
            row = logprobs[position - 1]
            best = torch.topk(row, top) if top else None
            pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
            out.append(TokenInfo(prompt_ids[position], float(row[prompt_ids[position]]), pairs))
        return out

    @property
    def running(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ engine thread

    def _serve(self, admitted: list[SequenceRequest]) -> None:
        with torch.inference_mode():
            self._evict()
            if admitted:
                self._admit(admitted)
            if self._rows:
                self._step()
            self._evict()

    def _fail(self, exc: BaseException, admitted: list[SequenceRequest]) -> None:
        for row in self._rows:
            row.request.listener.on_error(exc)
        for request in admitted:
            if not any(row.request is request for row in self._rows):
                request.listener.on_error(exc)
        self._rows, self._cache, self._mask = [], None, None

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        extra: dict[str, Any] = {self._cache_arg: cache if cache is not None else DynamicCache()}
        if self._takes_logits_to_keep:
            extra["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        return out.logits[:, -1, :].float(), getattr(out, self._cache_arg)

    def _admit(self, requests: list[SequenceRequest]) -> None:
        prompts = [r.prompt_ids for r in requests]
        prefix = self.prefixes.prefix_for(prompts) if self.prefixes is not None else None
        if prefix is not None:
            # Rows are [prefix][pad...][suffix]; the mask hides the pads, positions run on.
            out, _, mask = forward_after_prefix(self.model, prefix, prompts, self.pad_token_id, self.device, keep_last=1)
            logits, cache = out.logits[:, -1, :].float(), getattr(out, prefix.argument)
        else:
            input_ids, mask = self._left_pad(prompts)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache = self._forward(input_ids, mask, positions, None)
            if self.prefixes is not None:
                self.prefixes.remember(prompts[0], cache, row=0)
        rows = [_Row(r, self.tokenizer, logits.shape[-1], self.device, self.eos_ids) for r in requests]
        self._merge(rows, cache, mask)
        self.stats["admitted"] += len(rows)
        self._sample(rows, logits)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None or not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
            values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_pad_mask(self._mask, width), _pad_mask(mask, width)], dim=0)
        self._rows = self._rows + rows

    def _step(self) -> None:
        assert self._cache is not None and self._mask is not None
        rows = list(self._rows)
        input_ids = torch.tensor([[row.generated[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.position] for row in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits, self._cache = self._forward(input_ids, self._mask, positions, self._cache)
        for row in rows:
            row.position += 1
        self.step_log.append(len(rows))
        self.stats["steps"] += 1
        self._sample(rows, logits)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, then report it (rows in order of ``logits``)."""
        want_logprobs = any(row.spec.logprobs is not None for row in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        scores = logits.clone() if any(row.needs_adjusting for row in rows) else logits
        for i, row in enumerate(rows):
            if row.needs_adjusting:
                scores[i : i + 1] = row.adjust(scores[i : i + 1])
        tokens = scores.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if not sampling.is_greedy(row.spec.temperature)]
        if sampled:
            index = torch.tensor(sampled, device=scores.device)
            temperatures = torch.tensor([rows[i].spec.temperature for i in sampled], device=scores.device)
            top_p = torch.tensor([rows[i].spec.top_p for i in sampled], device=scores.device)
            warped = sampling.warp(scores.index_select(0, index), temperatures, top_p)
            for j, i in enumerate(sampled):
                tokens[i] = sampling.sample_row(warped[j], rows[i].generator)
        for i, row in enumerate(rows):
            self._accept(row, int(tokens[i]), None if raw_logprobs is None else raw_logprobs[i])

    def _accept(self, row: _Row, token: int, logprobs: torch.Tensor | None) -> None:
        row.generated.append(token)
        self.stats["tokens"] += 1
        if row.counts is not None:
            row.counts[token] += 1
        info = TokenInfo(token)
        if logprobs is not None and row.spec.logprobs is not None:
            top = torch.topk(logprobs, row.spec.logprobs) if row.spec.logprobs else None
            pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
            info = TokenInfo(token, float(logprobs[token]), pairs)
        if token in self.eos:
            piece = row.text.finish()
            if piece:
                row.request.listener.on_token(piece, None)
            row.finish_reason = "stop"
            return
        piece = row.text.push(token)
        row.request.listener.on_token(piece, info)
        if row.text.stopped:
            row.finish_reason = "stop"
        elif len(row.generated) >= row.spec.max_tokens or (self.max_positions and row.position + 1 >= self.max_positions):
            tail = row.text.finish()
            if tail:
                row.request.listener.on_token(tail, None)
            row.finish_reason = "length"

    def _evict(self) -> None:
        keep = []
        for index, row in enumerate(self._rows):
            if row.finish_reason is not None:
                self.stats["finished"] += 1
                row.request.listener.on_finish(row.finish_reason, len(row.generated))
            elif row.request.cancelled.is_set():
                self.stats["cancelled"] += 1
            else:
                keep.append(index)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        self._rows = [self._rows[i] for i in keep]
        selected = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(selected)
        self._mask = self._mask.index_select(0, selected)
        self._drop_padding_columns()

    def _drop_padding_columns(self) -> None:
        assert self._cache is not None and self._mask is not None
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first == 0:
            return
        self._mask = self._mask[:, first:]
        self._cache = DynamicCache(ddp_cache_data=[(layer.keys[..., first:, :], layer.values[..., first:, :]) for layer in self._cache.layers])


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    if missing <= 0:
        return states
    pad = states.new_zeros((*states.shape[:-2], missing, states.shape[-1]))
    return torch.cat([pad, states], dim=-2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing <= 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def wait_idle(engine: BatchEngine, timeout: float = 30.0) -> bool:
    """True once the engine has nothing running or waiting (for tests and shutdown)."""
    deadline = time.monotonic() + timeout
    while engine.running or engine.waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
