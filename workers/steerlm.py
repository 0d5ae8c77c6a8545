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
3. :func:`steerlm_sft` is the stage: label the iteration's responses, SFT the parent checkpoint on
   the labelled ones, register the result as a checkpoint. It takes a :class:`SteerLMSettings`
   (bind it with ``functools.partial``); it is not in ``STAGE_ORDER``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Checkpoint, CheckpointStatus, Prompt, Response
from policies.steerlm import (
    ATTRIBUTES,
    MAX_VALUE,
    MIN_VALUE,
    attribute_string,
    steerlm_messages,
)
from workers import lora_training as lora
from workers.stage_runner import StageContext, StageOutput

__all__ = [
    "CHECKPOINT_KIND",
    "SteerExample",
    "SteerLMSettings",
    "SteerTrainResult",
    "sft_attribute_conditioned",
    "sft_lora_update",
    "steerlm_checkpoint_id",
    "steerlm_sft",
]

log = structlog.get_logger(__name__)

CHECKPOINT_KIND = "steerlm_sft_lora_merged"
# Keeps this stage's sampling seed apart from the seeds of the stages in STAGE_ORDER.
_SEED_OFFSET = 7919


@dataclass(frozen=True)
class SteerLMSettings:
    """Labelling and SFT settings of the SteerLM stage (the coordinator maps config onto these)."""

    # SFT + LoRA
    learning_rate: float = 5e-4
    lr_scheduler_type: str = "linear"  # any transformers scheduler name: "linear", "constant", "cosine", ...
    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    max_length: int = 1024
    seed: int | None = None  # None: derived from the config seed and the iteration, like other stages
    # Labelling (the judge's own settings, steerlm.judge_samples and steerlm.judge_max_new_tokens, come from the config)
    response_kinds: tuple[str, ...] | None = None  # None: every response of the iteration (RLCD ones too)
    min_examples: int = 1  # fewer fully labelled responses than this skips training
    # Lineage: make the SteerLM checkpoint the iteration's candidate for the gate.
    register_as_candidate: bool = False

    def __post_init__(self) -> None:
        if self.min_examples < 1:
            raise ValueError(f"min_examples must be >= 1, got {self.min_examples}")


@dataclass(frozen=True)
class SteerExample(lora.ChatPrompt):
    """One SFT triple. ``prompt``: a str (one user turn) or chat messages without the attribute line."""

    prompt: str | Sequence[Mapping[str, str]]
    response: str
    attributes: Mapping[str, int]


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
            }
        )
    return records


def _plain_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Same layout as ModelRuntime.render_chat's fallback for tokenizers without a chat template.
    out = []
    for record in records:
        lines = [f"{str(m['role']).capitalize()}: {m['content']}" for m in record["prompt"]]
        out.append({"prompt": "\n".join([*lines, "Assistant:"]), "completion": " " + record["completion"][0]["content"]})
    return out


def sft_attribute_conditioned(
    base_model_path: str,
    examples: Sequence[SteerExample],
    out_dir: Path,
    settings: SteerLMSettings,
    *,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> SteerTrainResult:
    """SFT ``base_model_path`` on attribute-conditioned examples; write the merged model to ``out_dir``.

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
    )


def sft_lora_update(
    base_model_path: str,
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    settings: SteerLMSettings,
    *,
    kind: str,
    extra_metadata: Mapping[str, Any] | None = None,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> SteerTrainResult:
    """Generic SFT + LoRA on TRL conversational prompt-completion records; merged, checked, written atomically.

    ``records``: ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}``. If
    ``out_dir`` already holds a checkpoint of the same ``kind`` and parent, it is returned
    unchanged (``reused=True``); another checkpoint there raises ``CheckpointError``.
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
        return _train(base_model_path, list(records), out, settings, kind, dict(extra_metadata or {}), log_callback, progress)


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
    settings: SteerLMSettings,
    kind: str,
    extra_metadata: dict[str, Any],
    log_callback: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> SteerTrainResult:
    from trl import SFTConfig, SFTTrainer

    def dataset_rows(tokenizer) -> list[dict[str, Any]]:
        rows = [dict(r) for r in records]
        return rows if lora.has_chat_template(tokenizer) else _plain_records(rows)

    path, metadata = lora.train_lora_checkpoint(
        base_model_path,
        out,
        settings,
        kind=kind,
        trainer_cls=SFTTrainer,
        config_cls=SFTConfig,
        config_kwargs={
            "lr_scheduler_type": settings.lr_scheduler_type,
            "completion_only_loss": True,  # learn the answer given the attributes, not the prompt
        },
        rows=dataset_rows,
        num_examples=len(records),
        summarise=_summarise,
        seed=settings.seed if settings.seed is not None else 0,
        scratch_prefix="kaizen-steerlm-",
        log_callback=log_callback,
        progress=progress,
        extra_metadata=extra_metadata,
    )
    metrics = metadata["metrics"]
    seconds = round(metadata["train_seconds"], 3)
    log.info("steerlm.sft_done", checkpoint=str(path), examples=len(records), seconds=seconds, **metrics)
    return SteerTrainResult.from_checkpoint(path, metadata, num_examples=len(records))


# --------------------------------------------------------------------------- stage


def steerlm_checkpoint_id(iteration_id: int) -> str:
    """The SteerLM checkpoint of an iteration; fixed per iteration so a re-run reuses it."""
    return f"ckpt-{iteration_id:04d}-steerlm"


def _stage_seed(ctx: StageContext) -> int:
    return (ctx.settings.seed * 1_000_003 + ctx.iteration_id * 101 + _SEED_OFFSET) % (2**31)


def _labelled_rows(ctx: StageContext, kinds: tuple[str, ...] | None):
    query = (
        select(Response.id, Response.text, Prompt.text)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .where(Response.iteration_id == ctx.iteration_id)
        .order_by(Response.id)
    )
    if kinds is not None:
        query = query.where(Response.kind.in_(kinds))
    with ctx.sessions() as session:
        return session.execute(query).all()


def steerlm_sft(ctx: StageContext, settings: SteerLMSettings | None = None) -> StageOutput:
    """Label the iteration's responses with the parent checkpoint, then SteerLM-SFT the parent on them.

    Writes a ``candidate`` checkpoint row ``ckpt-NNNN-steerlm`` whose parent is the iteration's
    parent checkpoint (and, with ``register_as_candidate``, makes it the iteration's candidate).
    The stage result records, per response id, the attribute string it was trained with, and
    per attribute how many responses could not be labelled. Too few fully labelled responses
    (``min_examples``) skip training with the reason in the result.
    """
    from workers.stages.common import jsonable, parent_checkpoint, stage_judge

    s = settings or SteerLMSettings()
    seed = s.seed if s.seed is not None else _stage_seed(ctx)
    with ctx.sessions() as session:
        parent = parent_checkpoint(ctx, session)
        parent_path = parent.path
        labeller = stage_judge(ctx, session, "label", parent, seed=seed)
    rows = _labelled_rows(ctx, s.response_kinds)
    labels = labeller.label([(prompt, text) for _, text, prompt in rows], ATTRIBUTES)
    examples = [
        (response_id, SteerExample(prompt, text, dict(label.values)))
        for (response_id, text, prompt), label in zip(rows, labels, strict=True)
        if label.complete
    ]
    failures = Counter(name for label in labels for name in label.failures)
    summary: dict[str, Any] = {
        "judge": labeller.label_name,
        "responses": len(rows),
        "labelled": len(examples),
        "unlabelled": len(rows) - len(examples),
        "label_failures": {name: failures[name] for name in ATTRIBUTES if failures[name]},
        "labels": {str(rid): attribute_string(ex.attributes) for rid, ex in examples},
    }
    log.info("steerlm.labelled", iteration_id=ctx.iteration_id, **{k: v for k, v in summary.items() if k != "labels"})
    if len(examples) < s.min_examples:
        return StageOutput({**summary, "skipped": f"{len(examples)} fully labelled responses, fewer than min_examples={s.min_examples}"})

    checkpoint_id = steerlm_checkpoint_id(ctx.iteration_id)
    out_dir = ctx.settings.artifacts_dir / "checkpoints" / checkpoint_id
    trained = sft_attribute_conditioned(parent_path, [ex for _, ex in examples], out_dir, dataclasses.replace(s, seed=seed))

    def write(session: Session) -> dict[str, Any]:
        parent_row = parent_checkpoint(ctx, session)
        # A re-run must not reset the status the gate or an operator gave the checkpoint since.
        if session.get(Checkpoint, checkpoint_id) is None:
            session.add(
                Checkpoint(
                    id=checkpoint_id, parent_id=parent_row.id, base_model=parent_row.base_model,
                    path=str(trained.checkpoint_path), adapter_path=str(trained.adapter_path),
                    status=CheckpointStatus.candidate, created_iteration_id=ctx.iteration_id,
                    metrics=jsonable(trained.metrics),
                )
            )
            session.flush()
        if s.register_as_candidate:
            ctx.iteration(session).candidate_checkpoint_id = checkpoint_id
        return {}

    result = {
        **summary,
        "checkpoint_id": checkpoint_id,
        "examples": trained.num_examples,
        "train_seconds": round(trained.train_seconds, 3),
        **jsonable(trained.metrics),
    }
    return StageOutput(result, write)
