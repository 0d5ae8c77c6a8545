"""Training autoregressive reward models (ARMs) on preference pairs with the Bradley–Terry loss.

See the package docstring (workers/genarm/__init__.py). The trainer takes the config's ``genarm``
section as it is (``lora_r == 0``: a full fine-tune, for tiny models).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from policies.genarm import bradley_terry_loss, pair_accuracy, truncate_prompt_completion
from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint, write_checkpoint
from workers.model_profile import training_max_length
from workers.training import PreferenceExample

if TYPE_CHECKING:
    from daemon.config import GenArmStageSettings

log = structlog.get_logger(__name__)

ARM_CHECKPOINT_KIND = "genarm_arm"
_RELOAD_ATOL = 1e-4


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


def _with_lora(model: Any, settings: GenArmStageSettings) -> Any:
    if settings.lora_r == 0:
        return model  # full fine-tune
    from peft import LoraConfig, get_peft_model

    targets = settings.lora_target_modules
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets), bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _train_steps(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int, settings: GenArmStageSettings, seed: int) -> list[float]:
    """Adam steps on the BT loss; each step takes ``batch_size`` pairs from a reshuffled pass over them."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
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
    base_model_path: str, examples: Sequence[PreferenceExample], out_dir: Path, settings: GenArmStageSettings, *, seed: int = 0
) -> ArmTrainResult:
    """Train an ARM from ``base_model_path`` on ``examples`` with the Bradley–Terry loss; write it to ``out_dir``.

    ``settings`` is the config's ``genarm`` section, taken as it is (``lora_r == 0``: full fine-tune).

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
    # Positions past the model's context do not exist: max_length stays inside it.
    sequences = _tokenize_pairs(tokenizer, examples, training_max_length(settings.max_length, model.config, tokenizer))
    eval_batch = max(2, 2 * settings.batch_size)

    loss_before, accuracy_before = _bt_metrics(_score(model, sequences, pad_id, eval_batch), settings.beta)
    started = time.perf_counter()
    trainable = _with_lora(model, settings)
    losses = _train_steps(trainable, sequences, pad_id, settings, seed)
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
        "settings": settings.model_dump(mode="json", exclude={"enabled"}), "seed": seed, "num_pairs": len(examples), "metrics": metrics,
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


def trained_arm_beta(model_path: str | Path) -> float | None:
    """The β an ARM checkpoint was trained with (from its manifest), or None for any other model."""
    try:
        metadata = read_manifest(model_path).metadata
    except CheckpointError:
        return None
    return float(metadata["beta"]) if metadata.get("kind") == ARM_CHECKPOINT_KIND else None




def arm_checkpoint_id(iteration_id: int) -> str:
    """One ARM per iteration, named after it (re-runs reuse it); never clashes with ``ckpt-NNNN``."""
    return f"arm-{iteration_id:04d}"
