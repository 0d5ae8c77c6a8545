"""Batched sampling for :class:`workers.runtime.ModelRuntime`: prompts in, :class:`Generation` out.

Two schedulers decode the rows: ``static`` (chunks of ``batch_size`` rows through HF
``model.generate``, each chunk running until its longest row stops) and ``continuous``
(:mod:`workers.continuous_generation`: the server's :class:`~workers.batch_engine.BatchEngine`,
finished rows replaced by waiting ones between steps). Both turn a row's ids into a
:class:`Generation` with the same code, so greedy answers are the same text either way.

Stop strings are matched on the generated text only (:class:`GeneratedTextStop`), and a stopped
row's token count ends at its stop string, so ``Generation.num_tokens`` is what the text cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from policies.end_ramp import EndRamp
from policies.model_profile import check_context
from workers.batching import ProgressCallback, chunks_by_weight
from workers.continuous_generation import decode_continuously
from workers.prefix_cache import SharedPrefix, encode_shared_prefix
from workers.sampling import EndRampProcessor, TemperatureTopPWarper

if TYPE_CHECKING:
    import threading

    from policies.model_profile import ModelProfile

Scheduler = Literal["static", "continuous"]
SCHEDULERS: tuple[Scheduler, ...] = ("static", "continuous")

ChunkLogitsProcessors = Callable[[torch.Tensor, torch.Tensor], Sequence[LogitsProcessor]]
"""Called as ``make(input_ids, attention_mask)`` with each left-padded chunk before it is decoded."""


@dataclass(frozen=True)
class Generation:
    """One sampled completion.

    ``num_tokens`` counts the generated tokens that produced it (the EOS token included, tokens
    after a stop string excluded). ``finished`` is True when the model ended the completion itself
    (EOS, or a requested stop string) rather than running into ``max_new_tokens``.
    """

    text: str
    num_tokens: int
    finished: bool


class GeneratedTextStop(StoppingCriteria):
    """Stops a row once its generated text (not the prompt) contains a stop string.

    transformers' own ``stop_strings`` matches the tail of prompt + output, so a stop string that
    straddles the boundary ("is Paris" after a prompt ending in "is") stopped generation at once.
    Only the last few generated tokens are decoded each step: a stop string of c characters ends
    within the last c + 2 tokens.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, [s for s in stops if s], prompt_width
        self.window = max((len(s) for s in self.stops), default=0) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :]
        tails = generated[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


class GenerationMixin:
    """``generate`` for :class:`workers.runtime.ModelRuntime`, which supplies the attributes below."""

    model: Any
    tokenizer: Any
    device: torch.device
    profile: ModelProfile
    pad_token_id: int
    eos_token_ids: list[int]
    _lock: threading.RLock
    _forward_params: set[str]
    context_ids: Callable[[str], list[int]]
    _left_pad: Callable[[Sequence[Sequence[int]]], tuple[torch.Tensor, torch.Tensor]]
    _decode: Callable[[list[int]], str]

    def generate(
        self,
        prompts: list[str],
        *,
        num_samples: int | Sequence[int] = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int | None = None,
        batch_size: int = 16,
        stop_strings: list[str] | None = None,
        progress: ProgressCallback | None = None,
        logits_processors: ChunkLogitsProcessors | None = None,
        scheduler: Scheduler = "static",
        share_prefix: bool = True,
        end_ramp: EndRamp | None = None,
        **generate_kwargs: Any,
    ) -> list[list[Generation]]:
        """Sample completions for each already-rendered prompt: ``num_samples`` each, or
        ``num_samples[i]`` for prompt i, so callers with different needs share one decode.

        Prompts are processed in chunks of at most ``batch_size`` sequences (a prompt's samples
        stay in one chunk; at least one prompt per chunk). ``temperature == 0`` decodes greedily.
        With a ``seed`` the result is reproducible for the same arguments; the global RNG state is
        left untouched. Extra keyword arguments go to ``model.generate`` (e.g. ``min_new_tokens``).

        ``logits_processors(input_ids, attention_mask)`` is called once per chunk with the chunk's
        left-padded batch (one row per decoded sequence), so stateful processors (e.g. GenARM's
        per-chunk KV caches) start fresh for each chunk. transformers runs them after its own
        constraints (min_new_tokens ...) and before the temperature/top-p warpers
        (``GenerationMixin._get_logits_processor``).

        ``scheduler="continuous"`` decodes every sequence through a continuous-batching engine of
        at most ``batch_size`` rows instead (see the module docstring); the result has the same
        shape, order and meaning. Sequence (prompt i, sample j) then samples from its own
        generator seeded by ``continuous_generation.sequence_seed(seed, i, j)``. Per-chunk
        ``logits_processors`` and extra ``model.generate`` arguments exist only on the static path.

        ``share_prefix``: the tokens every prompt opens with (a judge rubric, a URIAL preamble) are
        prefilled once for the call and each chunk decodes on a copy of their keys and values
        (:mod:`workers.prefix_cache`; the continuous engine remembers openings across calls too).
        Not with ``logits_processors``, which see each chunk's rows whole. False prefills every
        prompt whole: the reference the reuse is tested against.

        ``end_ramp`` raises the end-of-turn logits over the last part of ``max_new_tokens``
        (:mod:`policies.end_ramp`; training samples), on either scheduler.
        """
        counts = sample_counts(num_samples, len(prompts))
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        if scheduler == "continuous" and (logits_processors is not None or generate_kwargs):
            raise ValueError("the continuous scheduler takes no logits_processors or extra generate arguments; use scheduler='static'")
        if not prompts:
            return []
        stops, contexts = self._stops_and_contexts(prompts, stop_strings, max_new_tokens)
        do_sample = temperature > 0
        # Greedy decoding is deterministic: decode each prompt once and repeat the result.
        decoded = counts if do_sample else [1] * len(prompts)
        if scheduler == "continuous":
            with self._lock:
                rows = decode_continuously(
                    self, contexts, decoded, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                    top_p=top_p, seed=seed, stops=stops, batch_size=batch_size, progress=progress, share_prefix=share_prefix,
                    end_ramp=end_ramp,
                )
            return [
                samples if do_sample else samples * counts[i]
                for i, samples in enumerate([self._to_generation(seq.ids, stops) for seq in row] for row in rows)
            ]
        config = self._generation_config(max_new_tokens, do_sample)
        # Generation-config fields (min_new_tokens, repetition_penalty, ...) go into the config;
        # transformers 5 deprecates passing them next to a generation_config object.
        passthrough = config.update(**generate_kwargs)
        warper = TemperatureTopPWarper(temperature, top_p) if do_sample else None
        results: list[list[Generation]] = []
        with self._lock, torch.inference_mode(), _seeded(seed, self.device):
            share = share_prefix and logits_processors is None
            prefix = encode_shared_prefix(self.model, contexts, self.device, self._forward_params) if share else None
            for chunk in chunks_by_weight(decoded, batch_size):
                # One row per decoded sequence, a prompt's rows together: what transformers'
                # num_return_sequences would build, but with a count per prompt.
                rows = [contexts[i] for i in chunk for _ in range(decoded[i])]
                new_tokens = self._decode_rows(rows, config, stops, warper, logits_processors, passthrough, prefix, end_ramp)
                start = 0
                for i in chunk:
                    samples = [self._to_generation(row, stops) for row in new_tokens[start : start + decoded[i]]]
                    start += decoded[i]
                    results.append(samples if do_sample else samples * counts[i])
                if progress is not None:
                    progress(len(results), len(prompts))
        return results

    def _stops_and_contexts(self, prompts: list[str], stop_strings: list[str] | None, max_new_tokens: int) -> tuple[list[str], list[list[int]]]:
        """The stop strings of a call and each prompt's ids, checked to leave room for ``max_new_tokens``."""
        # The prompt format's own stops (a base model's next "User:" / "# Query:") always apply.
        stops = list(dict.fromkeys(s for s in (*(stop_strings or []), *self.profile.stop_strings) if s))
        contexts = [self.context_ids(p) for p in prompts]
        for ids in contexts:
            check_context(self.profile, len(ids), max_new_tokens)
        return stops, contexts

    def _generation_config(self, max_new_tokens: int, do_sample: bool) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=1,  # rows are repeated per sample before decoding (see generate)
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids or None,
            bos_token_id=self.tokenizer.bos_token_id,
            # Temperature and top-p run in TemperatureTopPWarper (a top-k prefilter instead of
            # sorting the vocabulary); transformers' own warpers are switched off.
            **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}),
        )

    def _decode_rows(
        self,
        rows: list[list[int]],
        config: GenerationConfig,
        stops: list[str],
        warper: LogitsProcessor | None,
        logits_processors: ChunkLogitsProcessors | None,
        passthrough: dict[str, Any],
        prefix: SharedPrefix | None = None,
        end_ramp: EndRamp | None = None,
    ) -> list[list[int]]:
        """The new token ids of each row after one ``model.generate`` call on the left-padded rows
        (with a ``prefix``: ``[prefix][pad...][suffix]`` rows on a copy of its cache, whose tokens
        ``model.generate`` skips; positions follow the attention mask, so they run on over the pads)."""
        if prefix is None:
            input_ids, attention_mask = self._left_pad(rows)
        else:
            suffix_ids, suffix_mask = self._left_pad([row[prefix.length :] for row in rows])
            opening = torch.tensor([rows[0][: prefix.length]], dtype=torch.long, device=self.device).expand(len(rows), -1)
            input_ids = torch.cat([opening, suffix_ids], dim=-1)
            attention_mask = torch.cat([torch.ones_like(opening), suffix_mask], dim=-1)
            passthrough = {**passthrough, prefix.argument: prefix.cache_for(len(rows))}
        processors = list(logits_processors(input_ids, attention_mask)) if logits_processors else []
        if end_ramp is not None:
            processors.append(EndRampProcessor(end_ramp, self.eos_token_ids, input_ids.shape[1], config.max_new_tokens))
        if warper is not None:
            processors.append(warper)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            **({"logits_processor": LogitsProcessorList(processors)} if processors else {}),
            # Stop strings are matched on the generated text only, never across the prompt.
            **({"stopping_criteria": StoppingCriteriaList([GeneratedTextStop(self.tokenizer, stops, input_ids.shape[1])])} if stops else {}),
            **passthrough,
        )
        return out[:, input_ids.shape[1] :].tolist()

    def _to_generation(self, ids: list[int], stops: list[str]) -> Generation:
        """A row's new token ids as a Generation: cut after its first EOS or at its first stop string."""
        eos_at = next((k for k, t in enumerate(ids) if t in self.eos_token_ids), None)
        if eos_at is not None:
            ids, finished = ids[: eos_at + 1], True
        else:
            # A sequence that did not end in EOS either hit a stop string (and was padded after it
            # while the rest of its batch went on) or ran to max_new_tokens.
            finished = False
        text = self._decode(ids)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            ids = ids[: self._tokens_until_stop(ids, stops)]
            finished = True
        return Generation(text=text, num_tokens=len(ids), finished=finished)

    def _tokens_until_stop(self, ids: list[int], stops: list[str]) -> int:
        """Smallest k such that the decoded first k tokens contain a stop string (binary search)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            text = self._decode(ids[:mid])
            if any(s in text for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return hi


def sample_counts(num_samples: int | Sequence[int], prompts: int) -> list[int]:
    counts = [num_samples] * prompts if isinstance(num_samples, int) else list(num_samples)
    if len(counts) != prompts:
        raise ValueError(f"{len(counts)} sample counts for {prompts} prompts")
    if any(n < 1 for n in counts) or (isinstance(num_samples, int) and num_samples < 1):
        raise ValueError("num_samples must be >= 1")
    return counts


def _seeded(seed: int | None, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """With a seed, a reproducible RNG that leaves the process's untouched; without one the global
    RNG advances, so two unseeded calls give fresh samples."""
    if seed is None:
        return contextlib.nullcontext()
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return _manual_seed(seed, devices)


@contextlib.contextmanager
def _manual_seed(seed: int, devices: list[int]) -> Iterator[None]:
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
