"""GenARM: train autoregressive reward models (ARMs) from the loop's pairs, and decode guided by them.

Training (:func:`train_autoregressive_reward_model` in ``training.py``; the stage is ``workers/stages/genarm_train.py``)
    An ARM is a causal LM ``π_r`` whose reward is ``r(x, y) = β · Σ_t log π_r(y_t | x, y_<t)``. It is
    trained from a copy of a causal LM with the Bradley–Terry loss ``−log σ(r(x, y_c) − r(x, y_r))``
    on preference pairs: a PEFT LoRA adapter merged into the weights afterwards (``lora_r > 0``) or a
    full fine-tune (``lora_r == 0``, for tiny models). The loop is our own, short PyTorch loop:
    TRL 1.16's ``DPOTrainer`` has no reference-free mode any more and its CPO trainer lives in
    ``trl.experimental`` and adds an NLL term by default. Prompts and answers are tokenised exactly
    as the DPO stage tokenises them (chat template, completion = rendered assistant turn with its
    end marker). The merged model goes through ``write_checkpoint`` (atomic, manifest last), with β
    and the before/after loss and pair accuracy in the manifest metadata.

Guided decoding (:func:`guided_generate` in ``guidance.py``)
    Each next token is sampled from ``log p_base + (1/β) · Σ_i w_i · log p_arm_i`` (math in
    :mod:`policies.genarm`). It runs inside the base runtime's ``generate`` as a transformers
    ``LogitsProcessor``, so padding, seeding, stop strings and EOS handling are the runtime's own.
    Order: transformers applies custom processors after its built-in constraints (e.g.
    ``min_new_tokens``) and *before* the sampling warpers (``GenerationMixin._get_logits_processor``
    appends temperature, top-k, top-p after merging the custom list), so temperature scales and
    top-p truncates the *guided* distribution, not the base alone. The guidance is added to the
    base's raw logits, which differ from its log-probs by a per-row constant, so the distribution is
    the formula's exactly and weight 0 leaves the logits bit-for-bit unchanged.

    Each reward model keeps its own KV cache for the chunk being decoded: one forward over the
    left-padded prompt, then exactly one single-token forward per decoding step, with the attention
    mask grown by one column and position ids counted over real tokens only (left padding).

    On ``model.engine: vllm`` the same :class:`RewardGuidance` runs inside the engine as a vLLM v1
    logits processor (``vllm_processor.py``, imported only there since it imports vllm): each
    request keeps its own reward-model KV caches over its prompt and output tokens, guided and
    unguided requests share the engine's batch, and the processor follows the rows as vLLM
    adds, removes and reorders requests.

Weak-to-strong
    A reward model may be smaller than the base; it only has to share the tokenizer (same
    vocabulary, same ids for the same text), which :func:`check_shared_tokenizer` verifies before
    any decoding, raising :class:`TokenizerMismatchError` otherwise.
"""

from __future__ import annotations

from workers.genarm.guidance import (
    IncrementalReward,
    RewardGuidance,
    RewardGuidanceProcessor,
    RewardGuide,
    TokenizerMismatchError,
    check_shared_tokenizer,
    guided_generate,
    load_guides,
)
from workers.genarm.training import (
    ARM_CHECKPOINT_KIND,
    ArmTrainResult,
    arm_checkpoint_id,
    score_pairs,
    train_autoregressive_reward_model,
    trained_arm_beta,
)

__all__ = [
    "ARM_CHECKPOINT_KIND",
    "ArmTrainResult",
    "IncrementalReward",
    "RewardGuidance",
    "RewardGuidanceProcessor",
    "RewardGuide",
    "TokenizerMismatchError",
    "arm_checkpoint_id",
    "check_shared_tokenizer",
    "guided_generate",
    "load_guides",
    "score_pairs",
    "train_autoregressive_reward_model",
    "trained_arm_beta",
]
