"""GenARM guidance inside a vLLM engine: a vLLM v1 logits processor with per-request reward-model KV caches.

vLLM builds one :class:`GenArmLogitsProcessor` per engine (``LLM(logits_processors=[...])``,
which :class:`workers.vllm_engine.VllmRuntime` always passes as :data:`PROCESSOR_FQCN`). A request
asks for guidance through ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``: the id of a
:class:`~workers.genarm.guidance.RewardGuidance` (reward models, weights, β) registered by
:func:`guidance_extra_args`, which holds it weakly: it stays selectable while the caller holds it.
Requests without that key pass through untouched (their logits rows are not read), so guided and
plain requests share a batch.

Per guided request the processor keeps one :class:`~workers.genarm.guidance.IncrementalReward`
per reward model (a transformers ``DynamicCache`` over the request's prompt and output tokens).
vLLM tells it which batch row each request occupies (``update_state``: requests added, removed,
moved or swapped as the persistent batch condenses); at every step (``apply``) it feeds each
guided request's caches the tokens sampled since the last step (the whole prompt the first time,
in a forward of its own; then one token per step, the requests' caches of one reward model
stepped together in one batched forward, :meth:`IncrementalReward.step_together`) and adds
``(1/β) · Σ_i w_i · log p_arm_i`` (:func:`policies.genarm.guided_scores`, the HF path's maths) to
that request's row. Rows whose request has no new token (a prompt still being prefilled in
chunks) get the last guidance again without a forward.

vLLM applies processors that can change the argmax (this one) before penalties, temperature and
top-p / top-k, so, as on the HF engine, temperature scales and top-p truncates the *guided*
distribution. The registry lives in this process: it needs the in-process engine that
``VllmRuntime`` starts (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); a request whose id the engine's
process does not know fails with that explanation.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from policies.genarm import align_vocab_width, guided_scores
from workers.genarm.guidance import IncrementalReward, RewardGuidance

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

EXTRA_ARGS_KEY = "kaizen_genarm"
"""The ``SamplingParams.extra_args`` key whose value is a registered guidance id."""

PROCESSOR_FQCN = "workers.genarm.vllm_processor:GenArmLogitsProcessor"
"""How ``vllm.LLM(logits_processors=...)`` names the processor (loaded when the engine starts)."""

# Held weakly: a guidance stays selectable while its caller (and every request it guides) holds it.
_guidances: weakref.WeakValueDictionary[str, RewardGuidance] = weakref.WeakValueDictionary()
_guidances_lock = threading.Lock()


def guidance_extra_args(guidance: RewardGuidance) -> dict[str, Any]:
    """The ``SamplingParams.extra_args`` that guide a request by ``guidance`` (registered here)."""
    if not isinstance(guidance, RewardGuidance):
        raise ValueError(
            f"model.engine vllm takes GenARM guidance (workers.genarm.RewardGuidance) as logits processors, not {type(guidance).__name__}"
        )
    guidance_id = uuid.uuid4().hex
    with _guidances_lock:
        _guidances[guidance_id] = guidance
    return {EXTRA_ARGS_KEY: guidance_id}


def _guidance_of(params: SamplingParams) -> RewardGuidance | None:
    guidance_id = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if guidance_id is None:
        return None
    with _guidances_lock:
        guidance = _guidances.get(guidance_id)
    if guidance is None:
        raise ValueError(
            f"GenARM guidance {guidance_id!r} is not registered in this process: register it with "
            "workers.genarm.vllm_processor.guidance_extra_args and keep the guidance referenced while it decodes, on an engine that runs "
            "in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as VllmRuntime starts it)"
        )
    return guidance


class _GuidedRequest:
    """One guided request's reward-model caches and the last guidance they gave."""

    def __init__(self, guidance: RewardGuidance, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.guidance = guidance
        self.prompt_ids = prompt_ids
        self.output_ids = output_ids  # vLLM's own list of the request's output tokens, growing in place
        self.rewards = [IncrementalReward(model) for model in guidance.reward_models]
        self.fed = 0  # tokens of prompt + output the caches hold
        self.arm_logprobs: list[torch.Tensor] = []

    def new_tokens(self) -> list[int]:
        # Under async scheduling a not-yet-sampled output token is a placeholder -1 at the end.
        known = self.output_ids
        if known and known[-1] == -1:
            known = known[: known.index(-1)]
        prompt = len(self.prompt_ids)
        if self.fed < prompt:
            return self.prompt_ids[self.fed :] + list(known)
        return list(known[self.fed - prompt :])

    def feed(self, new: list[int], width: int, device: torch.device) -> None:
        """Feed ``new`` to every reward model's cache, one forward each (the prompt, or a step's tokens)."""
        ids = torch.tensor([new], dtype=torch.long)
        self.fed += len(new)
        mask = torch.ones((1, self.fed), dtype=torch.long)
        self.arm_logprobs = [align_vocab_width(reward.next_logprobs(ids, mask).to(device), width) for reward in self.rewards]

    def guided_row(self, row: torch.Tensor) -> torch.Tensor:
        """``row`` ([1, vocab] base logits) plus this request's guidance."""
        return guided_scores(row, self.arm_logprobs, self.guidance.weights, self.guidance.beta)


def _advance(requests: list[_GuidedRequest], width: int, device: torch.device) -> None:
    """Bring every request's reward log-probs up to its tokens: a prompt (or several new tokens)
    in a forward of its own, the usual one new token per request batched per reward model."""
    stepping: dict[int, list[tuple[_GuidedRequest, int, int]]] = {}  # id(model) -> (request, reward index, token)
    for request in requests:
        new = request.new_tokens()
        if len(new) == 1 and request.arm_logprobs:
            for k, reward in enumerate(request.rewards):
                stepping.setdefault(id(reward.model), []).append((request, k, new[0]))
            request.fed += 1
        elif new or not request.arm_logprobs:
            request.feed(new, width, device)
    for group in stepping.values():
        logprobs = IncrementalReward.step_together([request.rewards[k] for request, k, _ in group], [token for _, _, token in group])
        for row, (request, k, _) in enumerate(group):
            request.arm_logprobs[k] = align_vocab_width(logprobs[row : row + 1].to(device), width)


class GenArmLogitsProcessor(LogitsProcessor):
    """Adds each guided request's GenARM term to its row of the batch logits (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _guidance_of(sampling_params)  # an unknown id fails when the request is added, not mid-batch

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.requests: dict[int, _GuidedRequest] = {}  # batch row -> its guided request

    def is_argmax_invariant(self) -> bool:
        return False  # guidance changes greedy tokens: vLLM must apply it before greedy sampling too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, self._new_request)

    @staticmethod
    def _new_request(params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _GuidedRequest | None:
        guidance = _guidance_of(params)
        if guidance is None:
            return None
        if prompt_ids is None:
            raise ValueError("GenARM guidance needs the prompt's token ids (prompt embeddings are not supported)")
        return _GuidedRequest(guidance, prompt_ids, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        with torch.inference_mode():
            _advance(list(self.requests.values()), logits.shape[-1], logits.device)
            for index, request in self.requests.items():
                logits[index : index + 1] = request.guided_row(logits[index : index + 1])
        return logits
