"""Training autoregressive reward models (ARMs) on preference pairs with the Bradley–Terry loss.

See the package docstring (workers/genarm/__init__.py). The trainer takes the config's ``genarm``
section as it is (``lora_r == 0``: a full fine-tune, for tiny models).

Resumable like the TRL trainers (workers.trainer_state): every ``genarm.save_steps`` steps the
trainable weights, the optimizer, the batch order and the RNG states are saved as
``checkpoint-<step>/`` beside the ARM-to-be (and mirrored to a remote artifact store); an attempt
taken over resumes from the newest save, and a worker shutdown saves at the end of the step and
hands the stage over.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from policies.genarm import bradley_terry_loss, pair_accuracy, truncate_prompt_completion
from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint, write_checkpoint
from workers.graceful_stop import stop_requested
from workers.model_profile import training_max_length
from workers.trainer_state import (
    STEP_FILE, RemoteTrainerState, forget_saved_state, hand_over_if_stopped, resumable_output_dir, saved_step,
)
from workers.training import PreferenceExample

if TYPE_CHECKING:
    from daemon.config import GenArmStageSettings

log = structlog.get_logger(__name__)

ARM_CHECKPOINT_KIND = "genarm_arm"
_RELOAD_ATOL = 1e-4
_STATE_FILE = "state.pt"  # in a save: trainable weights, optimizer, batch queue, losses, RNG states


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
    resumed_from_step: int = 0  # the saved step this training resumed from (0: from the start)

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
            "resumed_from_step": self.resumed_from_step,
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


@dataclass
class _Progress:
    """Where the training loop is: what a save holds besides the weights and the optimizer."""

    step: int
    queue: list[int]
    losses: list[float]


def _save_state(state_dir: Path, model: Any, optimizer: Any, rng: random.Random, progress: _Progress, max_steps: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (a temp dir renamed), then drop the older saves."""
    name = f"checkpoint-{progress.step}"
    tmp = state_dir / f".saving-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "queue": list(progress.queue),
            "losses": list(progress.losses),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / _STATE_FILE,
    )
    (tmp / STEP_FILE).write_text(json.dumps({"global_step": progress.step, "max_steps": max_steps, "kind": ARM_CHECKPOINT_KIND}))
    final = state_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for older in state_dir.glob("checkpoint-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def _load_state(save: Path, model: Any, optimizer: Any, rng: random.Random) -> _Progress:
    """Restore a save into ``model``/``optimizer``/``rng``; the saved loop position."""
    state = torch.load(save / _STATE_FILE, map_location="cpu", weights_only=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["params"]):
        raise CheckpointError(f"the saved ARM trainer state {save} holds other trainable weights than this model (settings changed?)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    version, internal, gauss = state["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return _Progress(step=saved_step(save), queue=list(state["queue"]), losses=[float(x) for x in state["losses"]])


def _train_steps(
    model: Any,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    settings: GenArmStageSettings,
    seed: int,
    *,
    state_dir: Path | None = None,
    resume_from: Path | None = None,
    state_store: RemoteTrainerState | None = None,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Adam steps on the BT loss; each step takes ``batch_size`` pairs from a reshuffled pass over them.

    With a ``state_dir`` the loop's state is saved there every ``settings.save_steps`` steps and
    at the end of the step a shutdown request arrives in (then the stage is handed over);
    ``resume_from``: a save to continue from. ``log_callback({"step", "loss"})`` after each step.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    n_pairs = len(sequences) // 2
    per_step = min(settings.batch_size, n_pairs)
    progress = _Progress(step=0, queue=[], losses=[])
    if resume_from is not None:
        progress = _load_state(resume_from, model, optimizer, rng)
    model.train()
    while progress.step < settings.max_steps:
        if len(progress.queue) < per_step:
            epoch = list(range(n_pairs))
            rng.shuffle(epoch)
            progress.queue += epoch
        batch, progress.queue = progress.queue[:per_step], progress.queue[per_step:]
        sums = _completion_logprob_sums(model, [sequences[2 * i] for i in batch] + [sequences[2 * i + 1] for i in batch], pad_id)
        loss = bradley_terry_loss(sums[:per_step], sums[per_step:], settings.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.step += 1
        progress.losses.append(float(loss.item()))
        if log_callback is not None:
            log_callback({"step": progress.step, "loss": progress.losses[-1]})
        if state_dir is not None:
            stopping = stop_requested()  # a worker shutdown (workers/graceful_stop.py): save this step, hand over
            if stopping or progress.step % settings.save_steps == 0:
                save = _save_state(state_dir, model, optimizer, rng, progress, settings.max_steps)
                if state_store is not None:
                    state_store.upload(save)
            if stopping:
                hand_over_if_stopped(ARM_CHECKPOINT_KIND, progress.step, settings.max_steps, state_dir)
    model.eval()
    return progress.losses


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
        resumed_from_step=int(metadata.get("resumed_from_step", 0)),
    )


def train_autoregressive_reward_model(
    base_model_path: str,
    examples: Sequence[PreferenceExample],
    out_dir: Path,
    settings: GenArmStageSettings,
    *,
    seed: int = 0,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    state_store: RemoteTrainerState | None = None,
) -> ArmTrainResult:
    """Train an ARM from ``base_model_path`` on ``examples`` with the Bradley–Terry loss; write it to ``out_dir``.

    ``settings`` is the config's ``genarm`` section, taken as it is (``lora_r == 0``: full fine-tune).

    The checkpoint (merged full model + tokenizer, safetensors) is written atomically with a
    manifest whose metadata holds ``kind="genarm_arm"``, β, the settings and the metrics. Before it
    is committed, the saved model is reloaded and must reproduce the trained model's scores. If
    ``out_dir`` already holds the ARM of this base, it is returned without training (``reused``).

    With ``settings.save_steps > 0`` the training state is saved every that many steps beside
    ``out_dir`` (workers.trainer_state; ``state_store``: its copy in a remote artifact store) and
    a later call resumes from the newest save (``resumed_from_step``, also in the manifest); a
    worker shutdown request saves and raises StageInterrupted. ``log_callback``: each step's loss.
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
    trainable = _with_lora(model, settings)
    with resumable_output_dir(out, settings.save_steps, "kaizen-genarm-", state_store) as (state_dir, resume_from):
        resumed_from_step = saved_step(resume_from)
        if resume_from is not None:
            log.info("training.resumed", kind=ARM_CHECKPOINT_KIND, from_step=resumed_from_step, state=resume_from)
        started = time.perf_counter()
        losses = _train_steps(
            trainable, sequences, pad_id, settings, seed, log_callback=log_callback, state_store=state_store,
            state_dir=Path(state_dir) if settings.save_steps > 0 else None, resume_from=Path(resume_from) if resume_from else None,
        )
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
        "loss_history": [round(x, 6) for x in losses], "train_seconds": train_seconds, "resumed_from_step": resumed_from_step,
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
    forget_saved_state(out, state_store)  # the ARM exists: its trainer state is not needed
    log.info("genarm.trained", path=str(path), base=str(base_model_path), pairs=len(examples), train_seconds=round(train_seconds, 3), **metrics)
    return ArmTrainResult(
        path=str(path), beta=settings.beta, loss_before=loss_before, loss_after=loss_after, accuracy_before=accuracy_before,
        accuracy_after=accuracy_after, steps=len(losses), train_seconds=train_seconds, loss_history=tuple(losses),
        resumed_from_step=resumed_from_step,
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
