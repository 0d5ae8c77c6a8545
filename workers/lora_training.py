"""Plumbing shared by the LoRA fine-tuning stages: DPO (``workers.training``) and SteerLM SFT (``workers.steerlm``).

Both train a PEFT LoRA adapter with a TRL trainer on an fp32 copy of the parent checkpoint (bf16
only as autocast on a GPU), then merge the adapter and write the merged model atomically with
``workers.checkpoints.write_checkpoint``. Before the checkpoint is committed the merged model is
reloaded from disk and its logits on a probe input must match the in-memory merged model
(``PROBE_ATOL``), otherwise ``CheckpointError``. A checkpoint already at the output directory with
the same kind and parent is reused instead of training again.

Lineage adapters: a checkpoint trained on a checkpoint that itself carries an adapter also keeps,
beside its own adapter, one relative to the lineage's root (the model the first adapter of the
chain was trained on): the chain's adapters stacked into one (workers/lora_stacking.py, exact).
A vLLM engine running the root then serves the checkpoint by loading that adapter instead of
restarting on the merged weights (daemon/serving/champion.py). A chain stacks at most
``max_stacked_adapters`` adapters (``model.vllm_max_stacked_adapters``): the checkpoint that would
stack one more records ``lineage_start`` instead, since a server promoting it restarts on its
merged weights, and its descendants' lineage adapters are relative to it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint, write_checkpoint
from workers.graceful_stop import stop_requested
from workers.lora_stacking import read_adapter_config, stack_adapters, stacking_refusal
from workers.trainer_state import (
    RemoteTrainerState, forget_saved_state, hand_over_if_stopped, resumable_output_dir, saved_step, trainer_state_dir,
)

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from daemon.config import LoraTrainingSettings

__all__ = [
    "ADAPTER_SUBDIR",
    "LINEAGE_ADAPTER_SUBDIR",
    "PROBE_ATOL",
    "AdapterRecord",
    "ChatPrompt",
    "TrainResult",
    "existing_checkpoint",
    "has_chat_template",
    "probe_logits",
    "progress_bars",
    "summarise_history",
    "token_ids",
    "train_lora_checkpoint",
    "checkpoint_adapter",
    "checkpoint_lineage_adapter",
    "commit_merged",
    "trainer_state_dir",
    "training_arguments",
]

ADAPTER_SUBDIR = "adapter"
LINEAGE_ADAPTER_SUBDIR = "lineage_adapter"
PROBE_ATOL = 1e-4
_PROBE_MESSAGES = [{"role": "user", "content": "Describe the water cycle in one sentence."}]


@dataclass(frozen=True)
class AdapterRecord:
    """The LoRA adapter kept beside a merged checkpoint: merged = ``base`` + this adapter.

    It is recorded in the checkpoint's manifest metadata (``adapter``) and its files are listed in
    the manifest like every other file, so verifying the checkpoint verifies the adapter. A vLLM
    engine running ``base`` serves the checkpoint by loading the adapter instead of the merged
    weights (workers/vllm_engine.py).

    A lineage adapter (:func:`checkpoint_lineage_adapter`) is recorded the same way: merged =
    ``base`` (the lineage's root) + the ``depth`` adapters of the chain stacked into this one.
    """

    path: Path  # the adapter's directory (PEFT save_pretrained: adapter_config.json + safetensors)
    base: str  # the model path the adapter applies to (the manifest's ``parent``; a lineage's root)
    rank: int
    depth: int = 1  # how many trained adapters it stacks


def checkpoint_adapter(checkpoint_dir: str | Path) -> AdapterRecord | None:
    """The adapter a verified local checkpoint records, or None (an initial model, a full fine-tune)."""
    root = Path(checkpoint_dir)
    meta = read_manifest(root).metadata
    entry = meta.get("adapter")
    if not isinstance(entry, dict):
        return None
    return AdapterRecord(root / str(entry["path"]), str(meta.get("parent", "")), int(entry["rank"]))


def checkpoint_lineage_adapter(checkpoint_dir: str | Path) -> AdapterRecord | None:
    """The lineage adapter a verified local checkpoint records (``base``: the lineage's root), or
    None (a first candidate, a checkpoint that starts a lineage, one that could not stack)."""
    root = Path(checkpoint_dir)
    entry = read_manifest(root).metadata.get("lineage_adapter")
    if not isinstance(entry, dict):
        return None
    return AdapterRecord(root / str(entry["path"]), str(entry["root"]), int(entry["rank"]), int(entry["depth"]))


def _lineage_to_extend(parent: str) -> AdapterRecord | None:
    """The adapter that takes the lineage's root to ``parent``: its lineage adapter, else its own
    adapter. None when a child of ``parent`` needs no lineage adapter: the parent has no adapter
    (or no manifest: an initial model, a hub id), or it starts a lineage (its child's own adapter
    is already relative to the lineage's root)."""
    try:
        meta = read_manifest(parent).metadata
    except CheckpointError:
        return None
    if meta.get("lineage_start"):
        return None
    return checkpoint_lineage_adapter(parent) or checkpoint_adapter(parent)


def _lineage_metadata(parent: str, adapter_config: Mapping[str, Any], rank: int, max_stacked_adapters: int) -> tuple[dict[str, Any], AdapterRecord | None]:
    """The manifest entries of a new checkpoint's lineage and the parent's adapter to stack its own
    onto (None: no lineage adapter to write)."""
    extended = _lineage_to_extend(parent)
    if extended is None:
        return {}, None
    depth = extended.depth + 1
    refusal = stacking_refusal(adapter_config) or stacking_refusal(read_adapter_config(extended.path))
    if depth > max_stacked_adapters or refusal is not None:
        log.info("lora.lineage_started", parent=parent, depth=depth, max_stacked_adapters=max_stacked_adapters, not_stackable=refusal)
        return {"lineage_start": True}, None
    entry = {"path": LINEAGE_ADAPTER_SUBDIR, "root": extended.base, "rank": extended.rank + rank, "depth": depth}
    return {"lineage_adapter": entry}, extended


class ChatPrompt:
    """Mixin of the example dataclasses whose ``prompt`` is chat messages or a str (= one user turn)."""

    prompt: str | Sequence[Mapping[str, str]]

    def prompt_messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in self.prompt]


@dataclass
class TrainResult:
    checkpoint_path: str
    adapter_path: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    train_seconds: float
    reused: bool = False  # True when out_dir already held this checkpoint and no training ran

    @classmethod
    def from_checkpoint(cls, path: Path, metadata: Mapping[str, Any], *, reused: bool = False, **extra: Any):
        """The result recorded in a checkpoint's manifest ``metadata`` (``extra``: the subclass's fields)."""
        return cls(
            checkpoint_path=str(path),
            adapter_path=str(path / ADAPTER_SUBDIR),
            metrics=dict(metadata.get("metrics", {})),
            log_history=list(metadata.get("log_history", [])),
            train_seconds=float(metadata.get("train_seconds", 0.0)),
            reused=reused,
            **extra,
        )


# --------------------------------------------------------------------------- tokenizing


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def token_ids(tokenizer, conversation_or_text, **kwargs) -> list[int]:
    if isinstance(conversation_or_text, list):
        out = tokenizer.apply_chat_template(conversation_or_text, tokenize=True, return_dict=True, **kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=conversation_or_text)["input_ids"])


# --------------------------------------------------------------------------- set-up and training


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Temporarily switch the transformers/datasets progress bars (global switches) on or off."""
    import datasets
    from transformers.utils import logging as hf_logging

    was_hf, was_ds = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_hf else hf_logging.disable_progress_bar)()
        (datasets.enable_progress_bars if was_ds else datasets.disable_progress_bars)()


def existing_checkpoint(out: Path, base_model_path: str, kind: str) -> dict[str, Any] | None:
    """The manifest metadata of the checkpoint already at ``out`` (None if there is none), to reuse.

    A corrupted checkpoint, or one of another ``kind`` or parent, raises ``CheckpointError``.
    """
    if not (out / "manifest.json").exists():
        return None
    verify_checkpoint(out)
    meta = read_manifest(out).metadata
    if meta.get("kind") != kind or meta.get("parent") != str(base_model_path):
        raise CheckpointError(
            f"{out} already holds a different checkpoint (kind={meta.get('kind')!r}, parent={meta.get('parent')!r}); "
            f"refusing to reuse it for a {kind} of {base_model_path!r}"
        )
    return meta


def training_arguments(settings: LoraTrainingSettings, *, output_dir: str, seed: int, progress: bool, save: bool = False) -> dict[str, Any]:
    """The TRL config arguments both trainers share, from their config section (training / steerlm).

    ``save``: trainer state goes to ``output_dir`` every ``settings.save_steps`` (the newest only);
    else nothing is saved there. The merged model is committed by write_checkpoint either way.
    """
    use_cuda = torch.cuda.is_available()
    saving = {"save_strategy": "steps", "save_steps": settings.save_steps, "save_total_limit": 1} if save else {"save_strategy": "no"}
    return saving | {
        "output_dir": output_dir,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler_type,
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_length": settings.max_length,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": not use_cuda,
        "bf16": use_cuda and torch.cuda.is_bf16_supported(),
        "fp16": False,
        # Trades compute for memory: worth it for real models on a GPU, pure overhead on CPU. (The new
        # transformers-5 name; TRL's own default is gradient_checkpointing=True, a deprecated alias.)
        "activation_checkpointing": use_cuda,
        "disable_tqdm": not progress,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
    }


def train_lora_checkpoint(
    base_model_path: str,
    out: Path,
    settings: LoraTrainingSettings,
    *,
    kind: str,
    trainer_cls,
    config_cls,
    config_kwargs: Mapping[str, Any],
    rows: Callable[[Any], list[dict[str, Any]]],
    num_examples: int,
    summarise: Callable[[list[dict[str, Any]]], dict[str, float]],
    seed: int,
    scratch_prefix: str,
    log_callback: Callable[[dict[str, Any]], None] | None,
    progress: bool,
    trainer_kwargs: Mapping[str, Any] | None = None,
    check_trainer: Callable[[Any], None] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> tuple[Path, dict[str, Any]]:
    """Train a LoRA adapter on ``base_model_path`` with a TRL trainer; merge it and commit the checkpoint at ``out``.

    ``trainer_cls``/``config_cls``: the TRL trainer and its config (``config_kwargs``: its own
    arguments beyond :func:`training_arguments`); ``rows(tokenizer)``: the training dataset rows;
    ``summarise(log_history)``: the metrics; ``check_trainer``: called on the trainer before it
    trains. Returns the checkpoint path and its manifest metadata (``extra_metadata`` wins over
    the common entries). ``reporting``: TRL's ``report_to``/``run_name`` (workers.tracking).
    ``state_store``: a remote artifact store's copy of the saved trainer state (workers.trainer_state).
    ``max_stacked_adapters``: see :func:`commit_merged`.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    from workers.model_profile import training_max_length

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    # Full precision master weights: the adapter is merged into an fp32 base (bf16 only as autocast on GPU).
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    # Positions past the model's context do not exist: max_length stays inside it.
    settings = settings.model_copy(update={"max_length": training_max_length(settings.max_length, model.config, tokenizer)})
    targets = settings.lora_target_modules
    peft_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and log_callback is not None:
                log_callback(dict(logs, step=state.global_step))

    class _MirrorSaves(TrainerCallback):
        # Each save also goes to the remote artifact store: a worker elsewhere can resume from it.
        def on_save(self, args, state, control, **kwargs):
            if state_store is not None:
                state_store.upload(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    class _SaveAndStopOnShutdown(TrainerCallback):
        # The worker is shutting down (workers/graceful_stop.py): save this step's state, stop.
        def on_step_end(self, args, state, control, **kwargs):
            if stop_requested():
                control.should_save = True
                control.should_training_stop = True

    with resumable_output_dir(out, settings.save_steps, scratch_prefix, state_store) as (scratch, resume_from):
        arguments = training_arguments(settings, output_dir=scratch, seed=seed, progress=progress, save=settings.save_steps > 0) | dict(reporting or {})
        config = config_cls(**arguments, **config_kwargs)
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows(tokenizer)),
            processing_class=tokenizer,
            peft_config=peft_config,
            # Without saved state there is nothing to resume from: a shutdown then waits for the stage.
            callbacks=[_Forward(), _MirrorSaves(), _SaveAndStopOnShutdown()] if settings.save_steps > 0 else [_Forward()],
            **(trainer_kwargs or {}),
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # with tqdm disabled, Trainer prints every log dict
        if check_trainer is not None:
            check_trainer(trainer)
        started = time.perf_counter()
        resumed_from_step = saved_step(resume_from)
        if resume_from is not None:
            log.info("training.resumed", kind=kind, from_step=resumed_from_step, state=resume_from)
        trainer.train(resume_from_checkpoint=resume_from)
        train_seconds = time.perf_counter() - started
        hand_over_if_stopped(kind, trainer.state.global_step, trainer.state.max_steps, scratch)
        history = [dict(e) for e in trainer.state.log_history]

    metrics = summarise(history)
    metadata = {
        "kind": kind,
        "parent": str(base_model_path),
        "num_examples": num_examples,
        "settings": settings.model_dump(mode="json"),
        "metrics": metrics,
        "log_history": history,
        "train_seconds": train_seconds,
        "resumed_from_step": resumed_from_step,
        **(extra_metadata or {}),
    }
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.eval()
    committed = commit_merged(out, peft_model, tokenizer, metadata, max_stacked_adapters=max_stacked_adapters)
    forget_saved_state(out, state_store)  # the checkpoint exists: its trainer state is not needed
    return committed, metadata


# --------------------------------------------------------------------------- summary and commit


def summarise_history(
    history: list[dict[str, Any]],
    *,
    step_keys: tuple[str, ...] = ("loss",),
    step_metrics: Callable[[list[dict[str, Any]]], Mapping[str, float]],
) -> dict[str, float]:
    """Metrics of a trainer's log history: step count, final loss, ``step_metrics`` of the steps, train_loss.

    A step is a log entry holding all ``step_keys``; non-finite values are left out.
    """
    steps = [e for e in history if all(key in e for key in step_keys)]
    metrics: dict[str, float] = {"steps": float(len(steps))}
    if steps:
        metrics["loss"] = float(steps[-1]["loss"])
        metrics.update(step_metrics(steps))
    for entry in history:
        if "train_loss" in entry:
            metrics["train_loss"] = float(entry["train_loss"])
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    if has_chat_template(tokenizer):
        ids = token_ids(tokenizer, _PROBE_MESSAGES, add_generation_prompt=True)
    else:
        ids = token_ids(tokenizer, _PROBE_MESSAGES[0]["content"])
    return model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()


def commit_merged(out: Path, peft_model, tokenizer, metadata: dict[str, Any], *, max_stacked_adapters: int = 1) -> Path:
    """Merge the trained adapter, write merged model + tokenizer + adapter to ``out`` atomically, return its path.

    ``metadata`` is the manifest's (its ``parent``: the model the adapter was trained on); the
    adapter is recorded in it (``adapter``, see :class:`AdapterRecord`). The reloaded merged
    model must reproduce the in-memory one on a probe input, or nothing is committed.

    When the parent carries an adapter, the lineage adapter (the module docstring) is written
    too, as ``lineage_adapter/`` recorded under ``lineage_adapter`` (``path``, ``root``, ``rank``,
    ``depth``), as long as the chain stacks at most ``max_stacked_adapters`` adapters and all of
    them are plain LoRA; otherwise the metadata says ``lineage_start``. Both adapters' files are
    listed in the manifest like every other file.
    """
    from transformers import AutoModelForCausalLM

    adapter_config = peft_model.peft_config[peft_model.active_adapter]
    rank = int(adapter_config.r)
    lineage, extended = _lineage_metadata(str(metadata.get("parent", "")), adapter_config.to_dict(), rank, max_stacked_adapters)
    metadata = {**metadata, "adapter": {"path": ADAPTER_SUBDIR, "rank": rank}, **lineage}

    def write_fn(tmp: Path) -> None:
        # The adapter is saved before merging: merge_and_unload removes the LoRA layers.
        peft_model.save_pretrained(str(tmp / ADAPTER_SUBDIR), safe_serialization=True)
        if extended is not None:
            _write_lineage_adapter(extended, tmp / ADAPTER_SUBDIR, tmp / LINEAGE_ADAPTER_SUBDIR, metadata["lineage_adapter"])
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # Reliability check before commit: what is on disk must be the model we trained.
        expected = probe_logits(merged, tokenizer)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        reloaded.to(next(merged.parameters()).device)  # same device => same kernels, comparable at 1e-4
        actual = probe_logits(reloaded, tokenizer)
        if expected.shape != actual.shape or not torch.allclose(expected, actual, atol=PROBE_ATOL):
            diff = (expected - actual).abs().max().item() if expected.shape == actual.shape else float("nan")
            raise CheckpointError(
                f"saved merged model at {tmp} does not reproduce the in-memory merged model "
                f"(max |Δlogit| = {diff:.3g} > {PROBE_ATOL})"
            )

    return write_checkpoint(out, write_fn, metadata)


def _write_lineage_adapter(extended: AdapterRecord, own: Path, out: Path, entry: Mapping[str, Any]) -> None:
    """Stack the checkpoint's own adapter ``own`` onto the parent's ``extended`` into ``out``."""
    rank = stack_adapters(extended.path, own, out)
    if rank != entry["rank"]:  # the configs were checked before: a mismatch is a bug, not a refusal
        raise CheckpointError(f"the lineage adapter stacked onto {extended.path} has rank {rank}, expected {entry['rank']}")
    log.info("lora.lineage_adapter_written", root=entry["root"], depth=entry["depth"], rank=rank)
