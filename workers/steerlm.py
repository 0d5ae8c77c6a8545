"""SteerLM on the loop's own data: label responses with attribute values, then attribute-conditioned SFT.

1. The configured label judge (``judge.label_backend``, ``workers.judges``; by default the
   iteration's parent checkpoint, in text) rates each (prompt, response) on every SteerLM
   attribute with ``policies.steerlm``'s rubric, ``steerlm.judge_samples`` samples per
   response, parsed injection-proof and combined per attribute. A response with any attribute
   left unlabelled is not trained on: labels are never imputed.
2. :func:`sft_attribute_conditioned` fine-tunes a PEFT LoRA adapter with TRL ``SFTTrainer`` on
   (prompt, response, attributes) triples. Each example is TRL's conversational
   *prompt-completion* format::

       {"prompt": steerlm_messages([{"role": "user", "content": prompt}], attributes),
        "completion": [{"role": "assistant", "content": response}]}

   so the attribute string sits in the system message exactly as ``steerlm_messages`` puts it at
   inference, the chat template renders both, and the loss covers only the completion (the
   rendered assistant turn including its end marker, so the model also learns where to stop).
   The adapter is merged and the merged model written atomically with
   ``workers.checkpoints.write_checkpoint`` (reloaded logits checked against the in-memory model
   before commit, the plumbing shared with ``workers.training`` in ``workers.lora_training``).
3. The ``steerlm_sft`` stage (``workers/stages/steerlm_sft.py``) labels the iteration's responses,
   SFTs the parent checkpoint on the labelled ones with the config's ``steerlm`` section and
   publishes the result through the artifact store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from policies.steerlm import (
    ATTRIBUTES,
    MAX_VALUE,
    MIN_VALUE,
    attribute_string,
    steerlm_messages,
)
from policies.prompt_format import render_plain_prompt
from workers import lora_training as lora

if TYPE_CHECKING:
    from daemon.config import LoraTrainingSettings
    from workers.trainer_state import RemoteTrainerState

__all__ = [
    "CHECKPOINT_KIND",
    "SteerExample",
    "SteerTrainResult",
    "sft_attribute_conditioned",
    "sft_lora_update",
    "steerlm_checkpoint_id",
]

log = structlog.get_logger(__name__)

CHECKPOINT_KIND = "steerlm_sft_lora_merged"

@dataclass(frozen=True)
class SteerExample(lora.ChatPrompt):
    """One SFT triple. ``prompt``: a str (one user turn) or chat messages without the attribute line."""

    prompt: str | Sequence[Mapping[str, str]]
    response: str
    attributes: Mapping[str, int]
    # The attribute-conditioned prompt exactly as the server renders it (ModelRuntime.render_chat);
    # None: the chat template, or the plain format for a tokenizer without one.
    prompt_text: str | None = None


@dataclass
class SteerTrainResult(lora.TrainResult):
    num_examples: int = dataclasses.field(kw_only=True)


# --------------------------------------------------------------------------- SFT


def _conversational_records(examples: Sequence[SteerExample]) -> list[dict[str, Any]]:
    records = []
    for ex in examples:
        attribute_string(ex.attributes)  # a training label must be complete: raises on missing/invalid values
        records.append(
            {
                "prompt": steerlm_messages(ex.prompt_messages(), ex.attributes),
                "completion": [{"role": "assistant", "content": ex.response}],
                "prompt_text": ex.prompt_text,
            }
        )
    return records


def _trl_row(record: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """TRL's conversational record when the prompt was rendered with the chat template, else the
    rendered prompt text itself (a base model's URIAL or plain format) + the answer text."""
    text = record.get("prompt_text")
    if lora.has_chat_template(tokenizer) and (
        text is None or text == tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    ):
        return {"prompt": record["prompt"], "completion": record["completion"]}
    prompt = text if text is not None else render_plain_prompt(record["prompt"])
    return {"prompt": prompt, "completion": record["completion"][0]["content"]}


def sft_attribute_conditioned(
    base_model_path: str,
    examples: Sequence[SteerExample],
    out_dir: Path,
    settings: LoraTrainingSettings,
    *,
    seed: int = 0,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> SteerTrainResult:
    """SFT ``base_model_path`` on attribute-conditioned examples; write the merged model to ``out_dir``.

    ``settings`` is the config's ``steerlm`` section (any LoRA training section), taken as it is.

    Every example needs all attributes (``ValueError`` otherwise). The manifest metadata records
    the attribute set and the conditioning prefix, so a server can tell a SteerLM checkpoint apart.
    """
    if not examples:
        raise ValueError("sft_attribute_conditioned needs at least one example")
    records = _conversational_records(examples)
    return sft_lora_update(
        base_model_path,
        records,
        out_dir,
        settings,
        kind=CHECKPOINT_KIND,
        seed=seed,
        extra_metadata={
            "steerlm": {
                "attributes": list(ATTRIBUTES),
                "min_value": MIN_VALUE,
                "max_value": MAX_VALUE,
                "conditioning": "policies.steerlm.steerlm_messages",
            }
        },
        log_callback=log_callback,
        progress=progress,
        reporting=reporting,
        state_store=state_store,
        max_stacked_adapters=max_stacked_adapters,
    )


def sft_lora_update(
    base_model_path: str,
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    settings: LoraTrainingSettings,
    *,
    kind: str,
    seed: int = 0,
    extra_metadata: Mapping[str, Any] | None = None,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> SteerTrainResult:
    """Generic SFT + LoRA on TRL conversational prompt-completion records; merged, checked, written atomically.

    ``records``: ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}``. If
    ``out_dir`` already holds a checkpoint of the same ``kind`` and parent, it is returned
    unchanged (``reused=True``); another checkpoint there raises ``CheckpointError``.
    ``max_stacked_adapters``: the lineage adapter's limit (workers.lora_training.commit_merged).
    """
    out = Path(out_dir)
    if not records:
        raise ValueError("sft_lora_update needs at least one record")
    existing = lora.existing_checkpoint(out, base_model_path, kind)
    if existing is not None:
        return SteerTrainResult.from_checkpoint(
            out, existing, reused=True, num_examples=int(existing.get("num_examples", 0))
        )
    with lora.progress_bars(progress):
        return _train(
            base_model_path, list(records), out, settings, kind, seed, dict(extra_metadata or {}), log_callback, progress, reporting, state_store,
            max_stacked_adapters,
        )


def _sft_metrics(steps: list[dict[str, Any]]) -> dict[str, float]:
    metrics = {"first_loss": float(steps[0]["loss"])}
    accuracies = [float(e["mean_token_accuracy"]) for e in steps if "mean_token_accuracy" in e]
    if accuracies:
        metrics["final_mean_token_accuracy"] = accuracies[-1]
    return metrics


def _summarise(history: list[dict[str, Any]]) -> dict[str, float]:
    return lora.summarise_history(history, step_metrics=_sft_metrics)


def _train(
    base_model_path: str,
    records: list[Mapping[str, Any]],
    out: Path,
    settings: LoraTrainingSettings,
    kind: str,
    seed: int,
    extra_metadata: dict[str, Any],
    log_callback: Callable[[dict[str, Any]], None] | None,
    progress: bool,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> SteerTrainResult:
    from trl import SFTConfig, SFTTrainer

    def dataset_rows(tokenizer) -> list[dict[str, Any]]:
        return [_trl_row(r, tokenizer) for r in records]

    path, metadata = lora.train_lora_checkpoint(
        base_model_path,
        out,
        settings,
        kind=kind,
        trainer_cls=SFTTrainer,
        config_cls=SFTConfig,
        config_kwargs={"completion_only_loss": True},  # learn the answer given the attributes, not the prompt
        rows=dataset_rows,
        num_examples=len(records),
        summarise=_summarise,
        seed=seed,
        scratch_prefix="kaizen-steerlm-",
        log_callback=log_callback,
        progress=progress,
        extra_metadata=extra_metadata,
        reporting=reporting,
        state_store=state_store,
        max_stacked_adapters=max_stacked_adapters,
    )
    metrics = metadata["metrics"]
    seconds = round(metadata["train_seconds"], 3)
    log.info("steerlm.sft_done", checkpoint=str(path), examples=len(records), seconds=seconds, **metrics)
    return SteerTrainResult.from_checkpoint(path, metadata, num_examples=len(records))


def steerlm_checkpoint_id(iteration_id: int) -> str:
    """The SteerLM checkpoint of an iteration; fixed per iteration so a re-run reuses it."""
    return f"ckpt-{iteration_id:04d}-steerlm"
