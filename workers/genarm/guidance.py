"""GenARM guided decoding: each next token from ``log p_base + (1/β) · Σ_i w_i · log p_arm_i``.

See the package docstring (workers/genarm/__init__.py) for the order of logits processors, the
per-reward-model KV caches and the shared-tokenizer check.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from policies.genarm import align_vocab_width, guided_scores, validate_beta, validate_weights, vocabulary_differences

if TYPE_CHECKING:
    from workers.generation import Generation
    from workers.runtime import ModelRuntime

log = structlog.get_logger(__name__)

# Texts whose ids must agree between two tokenizers that pass the vocabulary check: the same
# vocabulary can still split text differently (normalisers, pre-tokenisers, merges).
_PROBE_TEXTS = (
    "Hello, world! How are you today?",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "Ünïcödé – “quotes”, 日本語, emoji 🙂",
    "def square(x):\n    return x ** 2  # code",
    "12345 + 67.89 = 1e-3?",
)


@dataclass(frozen=True)
class RewardGuide:
    """One reward model and its weight for a request."""

    model_path: str
    weight: float


class TokenizerMismatchError(ValueError):
    """A reward model whose tokenizer differs from the base's cannot guide it."""

    def __init__(self, base_name: str, reward_name: str, differences: Sequence[str]) -> None:
        self.base_name, self.reward_name, self.differences = base_name, reward_name, list(differences)
        super().__init__(
            f"reward model {reward_name!r} cannot guide base model {base_name!r}: their tokenizers differ "
            f"({'; '.join(differences)}). GenARM adds the reward model's next-token log-probs to the base's "
            "token by token, so both must share one vocabulary with the same ids for the same text. Use a reward "
            "model trained (genarm_train / train_autoregressive_reward_model) from a checkpoint with the base's "
            "tokenizer, e.g. a smaller model of the same family."
        )


# =========================================================================== tokenizer check


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def check_shared_tokenizer(base_tokenizer: Any, reward_tokenizer: Any, *, base_name: str, reward_name: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map the same text to the same ids.

    Checks the full token → id vocabulary (added/special tokens included), then the encodings of
    a few probe texts, with and without the special tokens the tokenizers add (e.g. BOS).
    """
    if base_tokenizer is reward_tokenizer:
        return
    differences = vocabulary_differences(base_tokenizer.get_vocab(), reward_tokenizer.get_vocab())
    if not differences:
        for text in _PROBE_TEXTS:
            for special in (False, True):
                base_ids, reward_ids = _ids(base_tokenizer, text, special=special), _ids(reward_tokenizer, text, special=special)
                if base_ids != reward_ids:
                    where = "with special tokens" if special else "as plain text"
                    differences.append(f"{text!r} encodes {where} to {base_ids[:12]} vs {reward_ids[:12]}")
                    break
            if differences:
                break
    if differences:
        raise TokenizerMismatchError(base_name, reward_name, differences)


# =========================================================================== guided decoding


class IncrementalReward:
    """One reward model's KV cache over the decoding steps of one chunk (HF) or one request (vLLM)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._cache_argument = "cache" if "cache" in params else "past_key_values"
        self._cache: DynamicCache | None = None

    @property
    def length(self) -> int:
        """Tokens (left padding included) the cache holds."""
        return 0 if self._cache is None else self._cache.get_seq_length()

    def next_logprobs(self, new_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Feed ``new_ids`` (the prompt, then one token per step) and return the next-token log-probs.

        ``attention_mask`` covers everything fed so far plus ``new_ids`` (left padding included).
        """
        if self._cache is None:
            # transformers' Cache API: one DynamicCache object, filled in place step by step.
            self._cache = DynamicCache(config=self.model.config)
        return self._forward(new_ids, attention_mask.to(self.device), self._cache)

    def _forward(self, new_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": new_ids.to(self.device),
            "attention_mask": mask,
            # transformers 5 names the cache argument ``cache`` (``past_key_values`` is deprecated).
            self._cache_argument: cache,
            "use_cache": True,
        }
        if self._takes_position_ids:
            # Real tokens count 0, 1, 2 ... from each row's own first token, whatever its padding.
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1] :]
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    @staticmethod
    def step_together(rewards: Sequence[IncrementalReward], tokens: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to ``rewards[i]`` (one-row, unpadded caches of one model) in one forward.

        Returns their next-token log-probs, ``[len(rewards), vocab]``. The caches, of different
        lengths, are left-padded into one batch (masked, positions counted per row as in a
        left-padded chunk); afterwards each row's cache is its slice of the batch's, padding
        dropped. Caches that are not plain full-attention layers (sliding windows), or a model that
        takes no position ids, go one forward per row instead.
        """
        if len(rewards) != len(tokens):
            raise ValueError(f"{len(rewards)} caches but {len(tokens)} tokens")
        first = rewards[0]
        caches = [reward._cache for reward in rewards]
        batchable = (
            len(rewards) > 1
            and first._takes_position_ids
            and all(reward.model is first.model for reward in rewards)
            and all(cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers) for cache in caches)
        )
        if not batchable:
            return torch.cat(
                [
                    reward.next_logprobs(torch.tensor([[token]]), torch.ones((1, reward.length + 1), dtype=torch.long))
                    for reward, token in zip(rewards, tokens, strict=True)
                ]
            )
        lengths = [reward.length for reward in rewards]
        width = max(lengths)
        batch = DynamicCache(config=first.model.config)
        for index in range(len(caches[0].layers)):  # type: ignore[union-attr]
            layers = [cache.layers[index] for cache in caches]  # type: ignore[union-attr]
            # Left padding along the sequence axis (-2) of each [1, heads, length, head_dim] tensor.
            keys = torch.cat([F.pad(layer.keys, (0, 0, width - n, 0)) for layer, n in zip(layers, lengths, strict=True)])
            values = torch.cat([F.pad(layer.values, (0, 0, width - n, 0)) for layer, n in zip(layers, lengths, strict=True)])
            batch.update(keys, values, index)
        mask = torch.zeros((len(rewards), width + 1), dtype=torch.long, device=first.device)
        for row, n in enumerate(lengths):
            mask[row, width - n :] = 1
        logprobs = first._forward(torch.tensor([[token] for token in tokens]), mask, batch)
        for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
            for layer, batched in zip(cache.layers, batch.layers, strict=True):  # type: ignore[union-attr]
                layer.keys = batched.keys[row : row + 1, :, width - n :]
                layer.values = batched.values[row : row + 1, :, width - n :]
        return logprobs


class RewardGuidanceProcessor(LogitsProcessor):
    """Adds ``(1/β) · Σ_i w_i · log p_arm_i(·)`` to the base model's next-token scores.

    Made for one ``generate`` call over one left-padded chunk (``prompt_ids``,
    ``prompt_attention_mask``); it is stateful (the reward models' KV caches) and must not be
    reused for another call. Sampling with ``num_return_sequences > 1`` is supported (rows are
    repeated per prompt, as ``generate`` does); beam search and assisted decoding, which do not
    add exactly one token per row per step, are refused.
    """

    def __init__(
        self,
        reward_models: Sequence[Any],
        weights: Sequence[float],
        beta: float,
        prompt_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
    ) -> None:
        if len(reward_models) != len(weights):
            raise ValueError(f"{len(reward_models)} reward models but {len(weights)} weights")
        if prompt_ids.shape != prompt_attention_mask.shape:
            raise ValueError(f"prompt ids {tuple(prompt_ids.shape)} and mask {tuple(prompt_attention_mask.shape)} differ")
        self.weights = validate_weights(weights)
        self.beta = validate_beta(beta)
        self._rewards = [IncrementalReward(m) for m in reward_models]
        self._prompt_ids = prompt_ids
        self._mask = prompt_attention_mask
        self._fed = 0  # columns of input_ids the reward models have seen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new_ids = self._new_tokens(input_ids)
        # Sampled tokens are real tokens: the mask grows by one column of ones per step.
        grown = input_ids.shape[1] - self._mask.shape[1]
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], grown))], dim=-1)
        self._fed = input_ids.shape[1]
        width = scores.shape[-1]
        arm_logprobs = [
            align_vocab_width(reward.next_logprobs(new_ids, self._mask).to(scores.device), width) for reward in self._rewards
        ]
        return guided_scores(scores, arm_logprobs, self.weights, self.beta)

    def _new_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._fed == 0:
            self._expand_to(input_ids)
            return input_ids
        if input_ids.shape[1] != self._fed + 1 or input_ids.shape[0] != self._mask.shape[0]:
            raise RuntimeError(
                f"GenARM guidance expects one new token per row per step; got input of shape {tuple(input_ids.shape)} "
                f"after {self._fed} columns for {self._mask.shape[0]} rows (beam search and assisted decoding are not supported)"
            )
        return input_ids[:, -1:]

    def _expand_to(self, input_ids: torch.Tensor) -> None:
        """Check the first call sees this processor's prompt chunk (repeated per sample when sampling n > 1)."""
        rows, prompts = input_ids.shape[0], self._prompt_ids.shape[0]
        if rows % prompts != 0:
            raise RuntimeError(f"GenARM guidance was built for {prompts} prompts but decodes {rows} rows")
        repeats = rows // prompts
        expected = self._prompt_ids.to(input_ids.device).repeat_interleave(repeats, dim=0)
        if not torch.equal(input_ids, expected):
            raise RuntimeError("GenARM guidance was called on a prompt batch other than the one it was built for")
        self._mask = self._mask.to(input_ids.device).repeat_interleave(repeats, dim=0)


@dataclass(frozen=True)
class RewardGuidance:
    """Reward models (loaded transformers models), their weights and β for one ``generate`` call.

    Called with a left-padded chunk it is the HF runtime's ``logits_processors`` argument
    (:data:`workers.generation.ChunkLogitsProcessors`): one fresh :class:`RewardGuidanceProcessor`
    per chunk. The vLLM runtime reads the fields instead and guides each request through
    :class:`workers.genarm.vllm_processor.GenArmLogitsProcessor`.
    """

    reward_models: tuple[Any, ...]
    weights: tuple[float, ...]
    beta: float

    def __post_init__(self) -> None:
        if len(self.reward_models) != len(self.weights):
            raise ValueError(f"{len(self.reward_models)} reward models but {len(self.weights)} weights")
        object.__setattr__(self, "weights", validate_weights(self.weights))
        object.__setattr__(self, "beta", validate_beta(self.beta))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[LogitsProcessor]:
        return [RewardGuidanceProcessor(self.reward_models, self.weights, self.beta, input_ids, attention_mask)]


def guided_generate(
    base: ModelRuntime,
    guides: Sequence[tuple[ModelRuntime, float]],
    prompts: list[str],
    *,
    beta: float,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
) -> list[Generation]:
    """One GenARM-guided completion per already-rendered prompt.

    ``guides`` are (reward runtime, weight) pairs; weights must be finite and >= 0 and β > 0
    (:class:`policies.genarm.GuidanceError`, a ValueError, otherwise). Reward models with weight 0
    are not run at all; with no positive weight the output is exactly ``base.generate``'s for the
    same seed. Every guide's tokenizer is checked against the base's first
    (:class:`TokenizerMismatchError`). ``base`` may be a transformers runtime (prompts decoded in
    chunks of ``batch_size``, reward-model forwards under the base runtime's lock only) or a
    :class:`workers.vllm_engine.VllmRuntime` (each prompt one vLLM request with its own reward-model
    KV caches, see :mod:`workers.genarm.vllm_processor`); the reward models are transformers models
    either way.
    """
    beta = validate_beta(beta)
    weights = validate_weights([weight for _, weight in guides])
    active = [(runtime, weight) for (runtime, _), weight in zip(guides, weights, strict=True) if weight > 0]
    for runtime, _ in active:
        check_shared_tokenizer(base.tokenizer, runtime.tokenizer, base_name=base.model_path, reward_name=runtime.model_path)
    guidance = None
    if active:
        guidance = RewardGuidance(tuple(runtime.model for runtime, _ in active), tuple(weight for _, weight in active), beta)
    started = time.perf_counter()
    results = base.generate(
        prompts,
        num_samples=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        stop_strings=[s for s in stop if s],
        logits_processors=guidance,
    )
    generations = [samples[0] for samples in results]
    log.info(
        "genarm.generated",
        base=base.model_path,
        reward_models=[runtime.model_path for runtime, _ in active],
        weights=[weight for _, weight in active],
        beta=beta,
        prompts=len(prompts),
        tokens=sum(g.num_tokens for g in generations),
        seconds=round(time.perf_counter() - started, 3),
    )
    return generations


def load_guides(
    guides: Sequence[RewardGuide], loader: Callable[[str], ModelRuntime] | None = None
) -> list[tuple[ModelRuntime, float]]:
    """Runtimes for ``guides`` (``loader`` defaults to ``workers.runtime_cache.get_runtime``, an LRU of 2 models)."""
    if loader is None:
        from workers.runtime_cache import get_runtime as loader
    return [(loader(guide.model_path), guide.weight) for guide in guides]
