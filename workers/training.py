"""One DPO update of the champion: TRL ``DPOTrainer`` + a PEFT LoRA adapter, merged and saved atomically.

Data format
    :class:`PreferenceExample` holds the prompt as chat messages (a plain ``str`` is taken as a
    single user turn) and the chosen/rejected answers as plain strings. They are handed to TRL in
    its *conversational* preference format::

        {"prompt": [{"role": "user", "content": ...}],
         "chosen": [{"role": "assistant", "content": ...}],
         "rejected": [{"role": "assistant", "content": ...}]}

    so TRL renders them with the model's own chat template, exactly as the model is prompted at
    inference (``add_generation_prompt=True``); the completion tokens are the rendered assistant
    turn including its end marker (``</s>`` for the tiny model), so DPO also teaches where to stop.
    A tokenizer without a chat template falls back to TRL's plain-text format (prompt text +
    answer + EOS). :func:`preference_margin` tokenizes the same way.

Reference model
    With ``ref_model=None`` and a ``peft_config``, TRL 1.16 wraps the base in a ``PeftModel`` and
    keeps ``self.ref_model = None`` (``DPOTrainer.__init__``: "If PEFT is used, the reference model
    is not needed since the adapter can be disabled to revert to the initial model"); in
    ``_compute_loss`` the reference log-probs come from ``self.model`` inside
    ``use_adapter(model, adapter_name=None)``, i.e. the same weights with the adapter disabled.
    No second copy of the model is held in memory. ``reference_model_path`` (a different model as
    KL anchor, e.g. the initial model) is loaded and passed as an explicit ``ref_model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.checkpoints import CheckpointError, read_manifest, verify_checkpoint, write_checkpoint

__all__ = [
    "DPOSettings",
    "PreferenceExample",
    "TrainResult",
    "dpo_update",
    "preference_margin",
    "sequence_logprobs",
]

ADAPTER_SUBDIR = "adapter"
CHECKPOINT_KIND = "dpo_lora_merged"
_PROBE_MESSAGES = [{"role": "user", "content": "Describe the water cycle in one sentence."}]
_PROBE_ATOL = 1e-4


@dataclass
class DPOSettings:
    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    max_length: int = 512
    seed: int = 0


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair. ``prompt``: chat messages (role/content dicts) or a str = one user turn."""

    prompt: str | Sequence[Mapping[str, str]]
    chosen: str
    rejected: str

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


# --------------------------------------------------------------------------- data


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _to_trl_records(examples: Iterable[PreferenceExample], tokenizer) -> list[dict[str, Any]]:
    records = []
    for ex in examples:
        if _has_chat_template(tokenizer):
            records.append(
                {
                    "prompt": ex.prompt_messages(),
                    "chosen": [{"role": "assistant", "content": ex.chosen}],
                    "rejected": [{"role": "assistant", "content": ex.rejected}],
                }
            )
        else:
            records.append({"prompt": _plain_prompt(ex), "chosen": ex.chosen, "rejected": ex.rejected})
    return records


def _plain_prompt(ex: PreferenceExample) -> str:
    return "\n".join(m["content"] for m in ex.prompt_messages()) + "\n"


def _ids(tokenizer, conversation_or_text, **kwargs) -> list[int]:
    if isinstance(conversation_or_text, list):
        out = tokenizer.apply_chat_template(conversation_or_text, tokenize=True, return_dict=True, **kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=conversation_or_text)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _prompt_completion_ids(tokenizer, ex: PreferenceExample, answer: str) -> tuple[list[int], list[int]]:
    """Same split as TRL's DPO preprocessing: the completion starts where prompt and prompt+answer diverge."""
    if _has_chat_template(tokenizer):
        msgs = ex.prompt_messages()
        prompt_ids = _ids(tokenizer, msgs, add_generation_prompt=True)
        full_ids = _ids(tokenizer, msgs + [{"role": "assistant", "content": answer}])
    else:
        eos = tokenizer.eos_token or ""
        text = answer if answer.endswith(eos) else answer + eos
        prompt_ids = _ids(tokenizer, _plain_prompt(ex))
        full_ids = _ids(tokenizer, _plain_prompt(ex) + text)
    cut = _common_prefix(prompt_ids, full_ids)
    return full_ids[:cut], full_ids[cut:]


@torch.no_grad()
def sequence_logprobs(model, tokenizer, examples: Sequence[PreferenceExample]) -> list[tuple[float, float]]:
    """(log π(chosen|prompt), log π(rejected|prompt)) per example, summed over completion tokens."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ex in examples:
        pair = []
        for answer in (ex.chosen, ex.rejected):
            prompt_ids, completion_ids = _prompt_completion_ids(tokenizer, ex, answer)
            if not completion_ids:
                pair.append(0.0)
                continue
            ids = torch.tensor([prompt_ids + completion_ids], device=device)
            logits = model(input_ids=ids).logits.float()
            logps = torch.log_softmax(logits[0, :-1], dim=-1)
            targets = ids[0, 1:]
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            pair.append(token_logps[len(prompt_ids) - 1 :].sum().item())
        out.append((pair[0], pair[1]))
    return out


def preference_margin(model_path: str, examples: Sequence[PreferenceExample]) -> float:
    """Mean over examples of log π(chosen|prompt) − log π(rejected|prompt) (plain forward passes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("preference_margin needs at least one example")
    with _progress_bars(False):
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    pairs = sequence_logprobs(model, tokenizer, examples)
    return sum(c - r for c, r in pairs) / len(pairs)


# --------------------------------------------------------------------------- training


def _summarise(log_history: list[dict[str, Any]]) -> dict[str, float]:
    steps = [e for e in log_history if "loss" in e and "rewards/margins" in e]
    metrics: dict[str, float] = {"steps": float(len(steps))}
    if steps:
        metrics["loss"] = float(steps[-1]["loss"])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            values = [float(e[key]) for e in steps if key in e]
            if values:
                metrics[key] = sum(values) / len(values)  # mean over logged steps
                metrics[f"final_{key}"] = values[-1]  # last logged step
    for e in log_history:
        if "train_loss" in e:
            metrics["train_loss"] = float(e["train_loss"])
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


@torch.no_grad()
def _probe_logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    if _has_chat_template(tokenizer):
        ids = _ids(tokenizer, _PROBE_MESSAGES, add_generation_prompt=True)
    else:
        ids = _ids(tokenizer, _PROBE_MESSAGES[0]["content"])
    return model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()


@contextlib.contextmanager
def _progress_bars(enabled: bool):
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


def _reused_result(out: Path, base_model_path: str) -> TrainResult:
    manifest = read_manifest(out)
    meta = manifest.metadata
    if meta.get("kind") != CHECKPOINT_KIND or meta.get("parent") != str(base_model_path):
        raise CheckpointError(
            f"{out} already holds a different checkpoint (kind={meta.get('kind')!r}, parent={meta.get('parent')!r}); "
            f"refusing to reuse it for parent {base_model_path!r}"
        )
    return TrainResult(
        checkpoint_path=str(out),
        adapter_path=str(out / ADAPTER_SUBDIR),
        metrics=dict(meta.get("metrics", {})),
        log_history=list(meta.get("log_history", [])),
        train_seconds=float(meta.get("train_seconds", 0.0)),
        reused=True,
    )


def dpo_update(
    base_model_path: str,
    examples: list[PreferenceExample],
    out_dir: str | Path,
    settings: DPOSettings,
    *,
    reference_model_path: str | None = None,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` with DPO from ``base_model_path``; write the merged model.

    The checkpoint at ``out_dir`` (written atomically, see workers.checkpoints) holds the merged
    full model + tokenizer as safetensors, and the adapter alone under ``adapter/``. Before the
    checkpoint is committed, the merged model is reloaded from disk and its logits on a probe
    input must match the in-memory merged model (atol 1e-4), otherwise CheckpointError. If
    ``out_dir`` already holds the checkpoint of this update (same parent), it is returned
    without training (``reused=True``).
    """
    out = Path(out_dir)
    if not examples:
        raise ValueError("dpo_update needs at least one preference example")
    if (out / "manifest.json").exists():
        verify_checkpoint(out)  # a corrupted existing checkpoint raises here
        return _reused_result(out, base_model_path)
    with _progress_bars(progress):
        return _dpo_update(base_model_path, examples, out, settings, reference_model_path, log_callback, progress)


def _dpo_update(
    base_model_path: str,
    examples: list[PreferenceExample],
    out: Path,
    settings: DPOSettings,
    reference_model_path: str | None,
    log_callback: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> TrainResult:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    use_cuda = torch.cuda.is_available()
    bf16 = use_cuda and torch.cuda.is_bf16_supported()

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    # Full precision master weights: the adapter is merged into an fp32 base (bf16 only as autocast on GPU).
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    ref_model = None
    if reference_model_path is not None and not _same_path(reference_model_path, base_model_path):
        ref_model = AutoModelForCausalLM.from_pretrained(str(reference_model_path), dtype=torch.float32)

    dataset = Dataset.from_list(_to_trl_records(examples, tokenizer))
    peft_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )

    history: list[dict[str, Any]] = []

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and log_callback is not None:
                log_callback(dict(logs, step=state.global_step))

    with tempfile.TemporaryDirectory(prefix="kaizen-dpo-") as scratch:
        config = DPOConfig(
            # Nothing is saved here (save_strategy="no"); the checkpoint goes through write_checkpoint.
            output_dir=scratch,
            beta=settings.beta,
            learning_rate=settings.learning_rate,
            num_train_epochs=settings.epochs,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            max_length=settings.max_length,
            seed=settings.seed,
            data_seed=settings.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not use_cuda,
            bf16=bf16,
            fp16=False,
            # Trades compute for memory: worth it for real models on a GPU, pure overhead on CPU. (The new
            # transformers-5 name; TRL's own default is gradient_checkpointing=True, a deprecated alias.)
            activation_checkpointing=use_cuda,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,  # None => the adapter-disabled policy is the reference (see module docstring)
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_Forward()],
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # with tqdm disabled, Trainer prints every log dict
        if ref_model is None and trainer.ref_model is not None:  # pragma: no cover - guards a TRL behaviour change
            raise RuntimeError("DPOTrainer loaded a separate reference model; expected the adapter-disabled base")
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        history = [dict(e) for e in trainer.state.log_history]

    metrics = _summarise(history)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.eval()
    metadata = {
        "kind": CHECKPOINT_KIND,
        "parent": str(base_model_path),
        "reference": str(reference_model_path) if ref_model is not None else "adapter_disabled_parent",
        "num_examples": len(examples),
        "settings": dataclasses.asdict(settings),
        "metrics": metrics,
        "log_history": history,
        "train_seconds": train_seconds,
    }

    def write_fn(tmp: Path) -> None:
        # The adapter is saved before merging: merge_and_unload removes the LoRA layers.
        peft_model.save_pretrained(str(tmp / ADAPTER_SUBDIR), safe_serialization=True)
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # Reliability check before commit: what is on disk must be the model we trained.
        expected = _probe_logits(merged, tokenizer)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        reloaded.to(next(merged.parameters()).device)  # same device => same kernels, comparable at 1e-4
        actual = _probe_logits(reloaded, tokenizer)
        if expected.shape != actual.shape or not torch.allclose(expected, actual, atol=_PROBE_ATOL):
            diff = (expected - actual).abs().max().item() if expected.shape == actual.shape else float("nan")
            raise CheckpointError(
                f"saved merged model at {tmp} does not reproduce the in-memory merged model "
                f"(max |Δlogit| = {diff:.3g} > {_PROBE_ATOL})"
            )

    path = write_checkpoint(out, write_fn, metadata)
    return TrainResult(
        checkpoint_path=str(path),
        adapter_path=str(path / ADAPTER_SUBDIR),
        metrics=metrics,
        log_history=history,
        train_seconds=train_seconds,
    )
