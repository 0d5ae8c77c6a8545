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

import gc
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
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

# Load bars per checkpoint would flood worker logs; the CLI shows its own progress.
hf_logging.disable_progress_bar()

log = structlog.get_logger(__name__)

RUNTIME_CACHE_SIZE = 2
"""How many models one worker process keeps loaded (most recently used first)."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch; units are prompts (or pairs)."""

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


class ModelRuntime:
    """A loaded causal LM plus tokenizer, ready for batched generation and scoring."""

    def __init__(self, model: Any, tokenizer: Any, *, model_path: str = "", device: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._lock = threading.RLock()  # seeding + generation must not interleave between threads

        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {model_path!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = int(tokenizer.pad_token_id)

        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids: list[int] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

        self._forward_params = set(inspect.signature(model.forward).parameters)
        self._bos_prefix = self._special_prefix()
        model.eval()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, model_path: str, *, device: str | None = None, dtype: str = "auto") -> ModelRuntime:
        """Load a local checkpoint directory or hub id."""
        device = device or default_device()
        torch_dtype = _resolve_dtype(dtype, device)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device != "cpu":
            kwargs["device_map"] = {"": device}  # place weights directly, no CPU copy first
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if device == "cpu":
            model.to(device)
        runtime = cls(model, tokenizer, model_path=str(model_path), device=device)
        log.info(
            "model_loaded",
            model_path=str(model_path),
            device=str(runtime.device),
            dtype=str(model.dtype).removeprefix("torch."),
            load_seconds=round(time.perf_counter() - started, 3),
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        return runtime

    # ------------------------------------------------------------------ text handling

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages to prompt text with the tokenizer's chat template (or a plain fallback)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        lines = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
        if add_generation_prompt:
            lines.append("Assistant:")
        return "\n".join(lines)

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

    def _context_ids(self, prompt: str) -> list[int]:
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
        **generate_kwargs: Any,
    ) -> list[list[Generation]]:
        """Sample ``num_samples`` completions for each already-rendered prompt.

        Prompts are processed in chunks of at most ``batch_size`` sequences (prompts x samples;
        at least one prompt per chunk). ``temperature == 0`` decodes greedily. With a ``seed`` the
        result is reproducible for the same arguments; the global RNG state is left untouched.
        Extra keyword arguments go to ``model.generate`` (e.g. ``min_new_tokens``).
        """
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if not prompts:
            return []
        stops = [s for s in (stop_strings or []) if s]
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
            **({"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}),
            **({"stop_strings": stops} if stops else {}),
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
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for chunk in _chunks(prompts, prompts_per_chunk):
                input_ids, attention_mask = self._left_pad([self._context_ids(p) for p in chunk])
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    **({"tokenizer": self.tokenizer} if stops else {}),
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
        pairs = [(self._context_ids(p), self.encode_completion(c)) for p, c in zip(prompts, completions, strict=True)]
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
                input_ids, attention_mask = self._left_pad([self._context_ids(p) for p in chunk])
                logits = self._forward_logits(input_ids, attention_mask, keep_last=1)[:, -1, :]
                probs = torch.softmax(logits.index_select(-1, cand_ids), dim=-1)
                results.extend(probs.cpu().tolist())
        return results


# ---------------------------------------------------------------------- process-wide cache

_cache: OrderedDict[tuple[str, str, str, int], ModelRuntime] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(model_path: str, device: str | None, dtype: str) -> tuple[str, str, str, int]:
    path = Path(model_path).expanduser()
    if path.exists():
        resolved = path.resolve()
        # A checkpoint directory rewritten in place must not be served from the stale cache entry.
        try:
            stamp = max((f.stat().st_mtime_ns for f in resolved.iterdir() if f.is_file()), default=0)
        except OSError:
            stamp = 0
        return str(resolved), device or default_device(), dtype, stamp
    return model_path, device or default_device(), dtype, 0  # a hub id


def get_runtime(model_path: str, *, device: str | None = None, dtype: str = "auto") -> ModelRuntime:
    """The process's runtime for ``model_path``: loaded on first use, reused afterwards (LRU of size 2)."""
    key = _cache_key(str(model_path), device, dtype)
    with _cache_lock:
        runtime = _cache.get(key)
        if runtime is not None:
            _cache.move_to_end(key)
            return runtime
        runtime = ModelRuntime.load(key[0], device=key[1], dtype=dtype)
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
