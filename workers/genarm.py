"""GenARM: train autoregressive reward models (ARMs) from the loop's pairs, and decode guided by them.

Training (:func:`train_autoregressive_reward_model`, stage :func:`genarm_train`)
    An ARM is a causal LM ``π_r`` whose reward is ``r(x, y) = β · Σ_t log π_r(y_t | x, y_<t)``. It is
    trained from a copy of a causal LM with the Bradley–Terry loss ``−log σ(r(x, y_c) − r(x, y_r))``
    on preference pairs: a PEFT LoRA adapter merged into the weights afterwards (``lora_r > 0``) or a
    full fine-tune (``lora_r == 0``, for tiny models). The loop is our own, short PyTorch loop:
    TRL 1.16's ``DPOTrainer`` has no reference-free mode any more and its CPO trainer lives in
    ``trl.experimental`` and adds an NLL term by default. Prompts and answers are tokenised exactly
    as the DPO stage tokenises them (chat template, completion = rendered assistant turn with its
    end marker). The merged model goes through ``write_checkpoint`` (atomic, manifest last), with β
    and the before/after loss and pair accuracy in the manifest metadata.

Guided decoding (:func:`guided_generate`)
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

Weak-to-strong
    A reward model may be smaller than the base; it only has to share the tokenizer (same
    vocabulary, same ids for the same text), which :func:`check_shared_tokenizer` verifies before
    any decoding, raising :class:`TokenizerMismatchError` otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import LogitsProcessor

from policies.genarm import (
    align_vocab_width,
    bradley_terry_loss,
    guided_scores,
    pair_accuracy,
    truncate_prompt_completion,
    validate_beta,
    validate_weights,
    vocabulary_differences,
)
from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint, write_checkpoint
from workers.stage_runner import StageContext, StageOutput
from workers.training import PreferenceExample

if TYPE_CHECKING:
    from workers.runtime import Generation, ModelRuntime

__all__ = [
    "ARM_CHECKPOINT_KIND",
    "ArmTrainResult",
    "ArmTrainSettings",
    "RewardGuidanceProcessor",
    "RewardGuide",
    "TokenizerMismatchError",
    "arm_checkpoint_id",
    "check_shared_tokenizer",
    "genarm_train",
    "guided_generate",
    "load_guides",
    "score_pairs",
    "train_autoregressive_reward_model",
    "trained_arm_beta",
]

log = structlog.get_logger(__name__)

ARM_CHECKPOINT_KIND = "genarm_arm"
ARM_STAGE = "genarm_train"
_RELOAD_ATOL = 1e-4

# Texts whose ids must agree between two tokenizers that pass the vocabulary check: the same
# vocabulary can still split text differently (normalisers, pre-tokenisers, merges).
_PROBE_TEXTS = (
    "Hello, world! How are you today?",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "Ünïcödé – “quotes”, 日本語, emoji 🙂",
    "def square(x):\n    return x ** 2  # code",
    "12345 + 67.89 = 1e-3?",
)


# =========================================================================== settings and results


@dataclass(frozen=True)
class ArmTrainSettings:
    """How to train one ARM. ``lora_r == 0`` means a full fine-tune (meant for tiny models)."""

    beta: float = 1.0
    learning_rate: float = 5e-4
    max_steps: int = 100
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    max_length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        validate_beta(self.beta)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(f"max_steps and batch_size must be >= 1, got {self.max_steps} and {self.batch_size}")
        if self.lora_r < 0 or self.lora_alpha <= 0:
            raise ValueError(f"lora_r must be >= 0 (0 = full fine-tune) and lora_alpha > 0, got {self.lora_r}, {self.lora_alpha}")


@dataclass(frozen=True)
class ArmTrainResult:
    """A trained ARM: where it is, its β, and BT loss / pair accuracy on the training pairs."""

    path: str
    beta: float
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float
    steps: int
    train_seconds: float
    loss_history: tuple[float, ...] = ()
    reused: bool = False  # out_dir already held this ARM; nothing was trained

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields for a stage result (the per-step history stays in the manifest)."""
        return {
            "path": self.path,
            "beta": self.beta,
            "loss_before": round(self.loss_before, 6),
            "loss_after": round(self.loss_after, 6),
            "pair_accuracy_before": round(self.accuracy_before, 6),
            "pair_accuracy_after": round(self.accuracy_after, 6),
            "steps": self.steps,
            "train_seconds": round(self.train_seconds, 3),
            "reused": self.reused,
        }


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


class _IncrementalReward:
    """One reward model's KV cache over the decoding steps of one chunk."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._cache: Any = None

    def next_logprobs(self, new_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Feed ``new_ids`` (the prompt, then one token per step) and return the next-token log-probs.

        ``attention_mask`` covers everything fed so far plus ``new_ids`` (left padding included).
        """
        mask = attention_mask.to(self.device)
        kwargs: dict[str, Any] = {
            "input_ids": new_ids.to(self.device),
            "attention_mask": mask,
            "past_key_values": self._cache,
            "use_cache": True,
        }
        if self._takes_position_ids:
            # Real tokens count 0, 1, 2 ... from each row's own first token, whatever its padding.
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1] :]
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        self._cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


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
        self._rewards = [_IncrementalReward(m) for m in reward_models]
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
    (:class:`TokenizerMismatchError`). Prompts are decoded in chunks of ``batch_size`` (as in
    ``ModelRuntime.generate``); reward-model forwards run under the base runtime's lock only.
    """
    beta = validate_beta(beta)
    weights = validate_weights([weight for _, weight in guides])
    active = [(runtime, weight) for (runtime, _), weight in zip(guides, weights, strict=True) if weight > 0]
    for runtime, _ in active:
        check_shared_tokenizer(base.tokenizer, runtime.tokenizer, base_name=base.model_path, reward_name=runtime.model_path)
    make_processors = None
    if active:
        models = [runtime.model for runtime, _ in active]
        active_weights = [weight for _, weight in active]

        def make_processors(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[LogitsProcessor]:
            return [RewardGuidanceProcessor(models, active_weights, beta, input_ids, attention_mask)]

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
        logits_processors=make_processors,
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
    """Runtimes for ``guides`` (``loader`` defaults to ``workers.runtime.get_runtime``, an LRU of 2 models)."""
    if loader is None:
        from workers.runtime import get_runtime as loader
    return [(loader(guide.model_path), guide.weight) for guide in guides]


def trained_arm_beta(model_path: str | Path) -> float | None:
    """The β an ARM checkpoint was trained with (from its manifest), or None for any other model."""
    try:
        metadata = read_manifest(model_path).metadata
    except CheckpointError:
        return None
    return float(metadata["beta"]) if metadata.get("kind") == ARM_CHECKPOINT_KIND else None


# =========================================================================== training


def _training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tokenize_pairs(tokenizer: Any, examples: Sequence[PreferenceExample], max_length: int) -> list[tuple[list[int], list[int]]]:
    """[(prompt ids, completion ids)] for chosen then rejected of each example, in order."""
    # The DPO stage's split (chat template; completion = the rendered assistant turn with its end
    # marker), so the ARM scores answers exactly as the loop renders them.
    from workers.training import prompt_completion_ids

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequences = []
    for example in examples:
        for answer in (example.chosen, example.rejected):
            prompt, completion = prompt_completion_ids(tokenizer, example, answer)
            if not prompt:  # the first completion token needs a position that predicts it
                prompt = [int(start)]
            sequences.append(truncate_prompt_completion(prompt, completion, max_length))
    return sequences


def _completion_logprob_sums(model: Any, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each sequence's completion tokens (right-padded batch, with grad)."""
    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :n] = 1
        scored[row, len(prompt) : n] = True
    input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and torch.cuda.is_bf16_supported() else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (picked * scored[:, 1:]).sum(-1)


@torch.no_grad()
def _score(model: Any, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    sums = [
        _completion_logprob_sums(model, sequences[i : i + batch_size], pad_id).float().cpu()
        for i in range(0, len(sequences), batch_size)
    ]
    model.train(was_training)
    return torch.cat(sums)


def _bt_metrics(sums: torch.Tensor, beta: float) -> tuple[float, float]:
    """(BT loss, pair accuracy) from interleaved chosen/rejected sums."""
    chosen, rejected = sums[0::2], sums[1::2]
    return float(bradley_terry_loss(chosen, rejected, beta).item()), pair_accuracy(chosen, rejected)


def score_pairs(model: Any, tokenizer: Any, examples: Sequence[PreferenceExample], *, beta: float, max_length: int = 512) -> tuple[float, float]:
    """(Bradley–Terry loss, pair accuracy) of a causal LM used as an ARM on ``examples``."""
    if not examples:
        raise ValueError("score_pairs needs at least one preference example")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _bt_metrics(_score(model, _tokenize_pairs(tokenizer, examples, max_length), int(pad_id), 16), beta)


def _with_lora(model: Any, settings: ArmTrainSettings) -> Any:
    if settings.lora_r == 0:
        return model  # full fine-tune
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _train_steps(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int, settings: ArmTrainSettings) -> list[float]:
    """Adam steps on the BT loss; each step takes ``batch_size`` pairs from a reshuffled pass over them."""
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    n_pairs = len(sequences) // 2
    per_step = min(settings.batch_size, n_pairs)
    queue: list[int] = []
    losses = []
    model.train()
    for _ in range(settings.max_steps):
        if len(queue) < per_step:
            epoch = list(range(n_pairs))
            rng.shuffle(epoch)
            queue += epoch
        batch, queue = queue[:per_step], queue[per_step:]
        sums = _completion_logprob_sums(model, [sequences[2 * i] for i in batch] + [sequences[2 * i + 1] for i in batch], pad_id)
        loss = bradley_terry_loss(sums[:per_step], sums[per_step:], settings.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
    model.eval()
    return losses


def _reused(out: Path, base_model_path: str) -> ArmTrainResult:
    metadata = verify_checkpoint(out).metadata
    if metadata.get("kind") != ARM_CHECKPOINT_KIND or metadata.get("parent") != str(base_model_path):
        raise CheckpointError(
            f"{out} already holds a different checkpoint (kind={metadata.get('kind')!r}, parent={metadata.get('parent')!r}); "
            f"refusing to reuse it as the ARM of {base_model_path!r}: remove it or pick another out_dir"
        )
    metrics = metadata["metrics"]
    return ArmTrainResult(
        path=str(out), beta=float(metadata["beta"]), loss_before=metrics["loss_before"], loss_after=metrics["loss_after"],
        accuracy_before=metrics["accuracy_before"], accuracy_after=metrics["accuracy_after"], steps=int(metrics["steps"]),
        train_seconds=float(metadata["train_seconds"]), loss_history=tuple(metadata.get("loss_history", ())), reused=True,
    )


def train_autoregressive_reward_model(
    base_model_path: str, examples: Sequence[PreferenceExample], out_dir: Path, settings: ArmTrainSettings
) -> ArmTrainResult:
    """Train an ARM from ``base_model_path`` on ``examples`` with the Bradley–Terry loss; write it to ``out_dir``.

    The checkpoint (merged full model + tokenizer, safetensors) is written atomically with a
    manifest whose metadata holds ``kind="genarm_arm"``, β, the settings and the metrics. Before it
    is committed, the saved model is reloaded and must reproduce the trained model's scores. If
    ``out_dir`` already holds the ARM of this base, it is returned without training (``reused``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if not examples:
        raise ValueError("training an autoregressive reward model needs at least one preference pair")
    if (out / "manifest.json").exists():
        return _reused(out, base_model_path)

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32).to(_training_device())
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    sequences = _tokenize_pairs(tokenizer, examples, settings.max_length)
    eval_batch = max(2, 2 * settings.batch_size)

    loss_before, accuracy_before = _bt_metrics(_score(model, sequences, pad_id, eval_batch), settings.beta)
    started = time.perf_counter()
    trainable = _with_lora(model, settings)
    losses = _train_steps(trainable, sequences, pad_id, settings)
    trained = trainable.merge_and_unload() if settings.lora_r > 0 else trainable
    trained.eval()
    train_seconds = time.perf_counter() - started
    after = _score(trained, sequences, pad_id, eval_batch)
    loss_after, accuracy_after = _bt_metrics(after, settings.beta)

    metrics = {
        "loss_before": loss_before, "loss_after": loss_after, "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after, "steps": len(losses),
    }
    metadata = {
        "kind": ARM_CHECKPOINT_KIND, "parent": str(base_model_path), "beta": settings.beta,
        "settings": dataclasses.asdict(settings), "num_pairs": len(examples), "metrics": metrics,
        "loss_history": [round(x, 6) for x in losses], "train_seconds": train_seconds,
    }
    probe = sequences[:2]

    def write_fn(tmp: Path) -> None:
        trained.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).to(next(trained.parameters()).device)
        expected, actual = after[:2], _score(reloaded, probe, pad_id, eval_batch)
        if not torch.allclose(expected, actual, atol=_RELOAD_ATOL, rtol=1e-5):
            raise CheckpointError(f"saved ARM at {tmp} does not reproduce the trained model's scores ({expected.tolist()} vs {actual.tolist()})")

    path = write_checkpoint(out, write_fn, metadata)
    log.info("genarm.trained", path=str(path), base=str(base_model_path), pairs=len(examples), train_seconds=round(train_seconds, 3), **metrics)
    return ArmTrainResult(
        path=str(path), beta=settings.beta, loss_before=loss_before, loss_after=loss_after, accuracy_before=accuracy_before,
        accuracy_after=accuracy_after, steps=len(losses), train_seconds=train_seconds, loss_history=tuple(losses),
    )


# =========================================================================== stage


def _iteration_pairs(session: Session, iteration_id: int) -> list[PreferenceExample]:
    from daemon.db.models import Pair, Prompt, Response

    rows = session.execute(
        select(Prompt.text, Pair.chosen_response_id, Pair.rejected_response_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Pair.iteration_id == iteration_id)
        .order_by(Pair.id)
    ).all()
    texts = dict(session.execute(select(Response.id, Response.text).where(Response.iteration_id == iteration_id)).all())
    return [PreferenceExample(prompt=prompt, chosen=texts[c], rejected=texts[r]) for prompt, c, r in rows]


def _arm_seed(ctx: StageContext, settings: ArmTrainSettings) -> int:
    # Deterministic per (config seed, iteration, ARM seed): a re-run trains the same ARM.
    return zlib.crc32(f"{ARM_STAGE}:{ctx.settings.seed}:{ctx.iteration_id}:{settings.seed}".encode()) % (2**31)


def arm_checkpoint_id(iteration_id: int) -> str:
    """One ARM per iteration, named after it (re-runs reuse it); never clashes with ``ckpt-NNNN``."""
    return f"arm-{iteration_id:04d}"


def genarm_train(ctx: StageContext, *, settings: ArmTrainSettings | None = None, reward_base_path: str | None = None) -> StageOutput:
    """Stage: train an ARM on this iteration's preference pairs.

    Starts from ``reward_base_path`` if given, else from the iteration's parent checkpoint (the
    champion the pairs were sampled from). Skipped (no ``path`` in the result) with fewer pairs
    than ``training.min_pairs``. The ARM is an artifact, not a lineage checkpoint: it is written
    like the DPO candidate (``workers.artifacts``: staged locally, published under a remote
    ``artifacts_url``) and recorded only in this stage's result: ``path`` (its URI), β, loss and
    pair accuracy before/after.
    """
    from daemon.db.models import Checkpoint
    from workers import artifacts

    settings = settings or ArmTrainSettings()
    with ctx.sessions() as session:
        parent = session.get(Checkpoint, ctx.iteration(session).parent_checkpoint_id)
        assert parent is not None, "iterations reference an existing checkpoint by foreign key"
        parent_path = parent.path
        examples = _iteration_pairs(session, ctx.iteration_id)
    min_pairs = ctx.settings.training.min_pairs
    if len(examples) < min_pairs:
        return StageOutput({"skipped": f"{len(examples)} pairs, fewer than training.min_pairs={min_pairs}", "pairs": len(examples)})
    base_path = reward_base_path or parent_path
    arm_id = arm_checkpoint_id(ctx.iteration_id)
    trained = train_autoregressive_reward_model(
        artifacts.model_path_for_loading(ctx.settings, base_path),
        examples,
        artifacts.checkpoint_staging_dir(ctx.settings, arm_id),
        dataclasses.replace(settings, seed=_arm_seed(ctx, settings)),
    )
    uri = artifacts.publish_checkpoint(ctx.settings, trained.path, arm_id)
    return StageOutput({**trained.summary(), "path": uri, "base_model_path": str(base_path), "pairs": len(examples)})
