"""The model runtime every stage uses: one loaded causal LM and its tokenizer.

One :class:`ModelRuntime` wraps a Hugging Face causal LM and its tokenizer. This module holds what
the rest builds on: loading, chat rendering, the context window, tokenisation and the forward
pass. Generation is :mod:`workers.generation`, log-prob scoring :mod:`workers.scoring`, model
files and GGUF conversion :mod:`workers.model_files`, and the per-process LRU of loaded runtimes
:mod:`workers.runtime_cache`.

Tokenisation is done here, not by ``tokenizer(..., padding=True)``: prompts are encoded one by one
(:meth:`ModelRuntime.encode_prompt`) and padded by hand, so generation, log-prob scoring and the
next-token judge all see exactly the same prompt ids, and the prompt/completion boundary of a
scored pair is exact (prompt and completion are tokenised separately and the ids concatenated).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
import torch

from policies.model_profile import ModelProfile, check_context, fits_context
from policies.prompt_format import FORMAT_CHAT_TEMPLATE, FORMAT_URIAL, render_plain_prompt
from workers.batching import left_pad
from workers.generation import GenerationMixin
from workers.model_files import load_causal_lm, load_tokenizer
from workers.model_profile import profile_of
from workers.scoring import ScoringMixin

if TYPE_CHECKING:
    from workers.batch_engine import SequenceEngine

log = structlog.get_logger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


class ModelRuntime(GenerationMixin, ScoringMixin):
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
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._init_text(
            tokenizer, model.config, getattr(model, "generation_config", None),
            model_path=model_path, prompt_format=prompt_format, context_length=context_length,
        )
        self._forward_params = set(inspect.signature(model.forward).parameters)
        model.eval()

    def _init_text(
        self, tokenizer: Any, config: Any, generation_config: Any, *, model_path: str, prompt_format: str, context_length: int | None
    ) -> None:
        """The tokenizer side every engine shares: profile, padding, EOS ids, the BOS prefix."""
        self.tokenizer = tokenizer
        self.model_path = model_path
        self._lock = threading.RLock()  # seeding + generation must not interleave between threads
        # Read before the pad fallback below, so the profile records the tokenizer as it is.
        self.profile: ModelProfile = profile_of(
            config, tokenizer, generation_config=generation_config, prompt_format=prompt_format, context_length=context_length,
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
        self._bos_prefix = self._special_prefix()
        self._urial_preset: Any = None

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

    runs_logits_processors = True
    """Whether the server's engine of this runtime applies per-sequence logits processors (GenARM,
    grammars); one that does not gets GenARM guidance as ``SequenceRequest.reward_guidance``."""

    def batch_engine(self, *, max_batch_size: int = 16, max_waiting: int = 256, name: str = "engine") -> SequenceEngine:
        """The server's continuous-batching decoding loop on this runtime (workers/batch_engine.py)."""
        from workers.batch_engine import BatchEngine

        return BatchEngine(self, max_batch_size=max_batch_size, max_waiting=max_waiting, name=name)

    @property
    def logits_width(self) -> int:
        """The width of the model's logits (can exceed the tokenizer's length)."""
        embeddings: Any = self.model.get_output_embeddings()
        return int(embeddings.weight.shape[0]) if embeddings is not None else len(self.tokenizer)

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

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(seqs, self.pad_token_id, self.device)

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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
