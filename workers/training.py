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
    A rejected answer that was cut at the token budget (``rejected_unfinished``) never ended, so it
    is trained without that marker: with it, DPO would lower the probability of ending right where
    the answer should have ended long before (:func:`without_end_marker`).
    A prompt rendered otherwise (a base model's URIAL or plain format, ``prompt_text``) is handed
    to TRL as that exact text (prompt text + answer + EOS), so DPO trains on the prompt the model
    was sampled with. :func:`preference_margin` tokenizes the same way.

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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from policies.prompt_format import render_plain_prompt
from workers.lora_training import (
    ADAPTER_SUBDIR,
    ChatPrompt,
    TrainResult,
    existing_checkpoint,
    has_chat_template,
    progress_bars,
    summarise_history,
    token_ids,
    train_lora_checkpoint,
)

if TYPE_CHECKING:
    from workers.trainer_state import RemoteTrainerState
    from daemon.config import TrainingSettings

__all__ = [
    "ADAPTER_SUBDIR",
    "PreferenceExample",
    "TrainResult",
    "dpo_update",
    "preference_margin",
    "prompt_completion_ids",
    "sequence_logprobs",
    "trl_records",
    "unfinished_aware_trainer",
    "uses_chat_template",
    "without_end_marker",
]

CHECKPOINT_KIND = "dpo_lora_merged"


@dataclass(frozen=True)
class PreferenceExample(ChatPrompt):
    """A preference pair. ``prompt``: chat messages (role/content dicts) or a str = one user turn.

    ``prompt_text`` is the prompt exactly as the model was sampled with it
    (``ModelRuntime.render_chat``); None renders ``prompt`` in the documented plain format.
    """

    prompt: str | Sequence[Mapping[str, str]]
    chosen: str
    rejected: str
    prompt_text: str | None = None
    # The rejected answer was cut at max_new_tokens: it is trained as generated, with no end marker.
    rejected_unfinished: bool = False

    def rendered_prompt(self) -> str:
        return self.prompt_text if self.prompt_text is not None else render_plain_prompt(self.prompt_messages())


# --------------------------------------------------------------------------- data


def uses_chat_template(tokenizer, ex: PreferenceExample) -> bool:
    """Whether ``ex`` was rendered with ``tokenizer``'s chat template: then TRL renders it the same
    way (conversational format, completion = the assistant turn with its end marker); otherwise
    the rendered prompt text itself is trained on (prompt text + answer + EOS)."""
    if not has_chat_template(tokenizer):
        return False
    if ex.prompt_text is None:
        return True
    return ex.prompt_text == tokenizer.apply_chat_template(ex.prompt_messages(), tokenize=False, add_generation_prompt=True)


def trl_records(examples: Iterable[PreferenceExample], tokenizer) -> list[dict[str, Any]]:
    """The examples in TRL's preference format; with a ``rejected_unfinished`` column only where
    some example is flagged, so otherwise no dataset pass is added (:func:`unfinished_aware_trainer`)."""
    examples = list(examples)
    flagged = any(ex.rejected_unfinished for ex in examples)
    records = []
    for ex in examples:
        if uses_chat_template(tokenizer, ex):
            record: dict[str, Any] = {
                "prompt": ex.prompt_messages(),
                "chosen": [{"role": "assistant", "content": ex.chosen}],
                "rejected": [{"role": "assistant", "content": ex.rejected}],
            }
        else:
            record = {"prompt": ex.rendered_prompt(), "chosen": ex.chosen, "rejected": ex.rejected}
        records.append(record | {REJECTED_UNFINISHED: ex.rejected_unfinished} if flagged else record)
    return records


REJECTED_UNFINISHED = "rejected_unfinished"


def without_end_marker(ids: Sequence[int], special_ids: set[int], is_blank: Callable[[int], bool]) -> list[int]:
    """``ids`` (a tokenized completion) without its end marker: the last special token (``</s>``,
    ``<|im_end|>``) and the blank tokens a chat template puts after it (``"\n"``); unchanged
    when it does not end with one."""
    end = len(ids)
    while end > 0 and ids[end - 1] not in special_ids and is_blank(ids[end - 1]):
        end -= 1
    if end > 0 and ids[end - 1] in special_ids:
        return list(ids[: end - 1])
    return list(ids)


def unfinished_aware_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (TRL's DPOTrainer) whose prepared dataset trains each cut rejected answer
    without the end marker TRL adds to every completion."""

    class UnfinishedAwareTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[no-untyped-def]
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if REJECTED_UNFINISHED not in (prepared.column_names or ()):
                return prepared
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            special = set(tokenizer.all_special_ids)

            def strip(example: dict[str, Any]) -> dict[str, Any]:
                ids = example["rejected_ids"]
                if example[REJECTED_UNFINISHED]:
                    ids = without_end_marker(ids, special, lambda i: not tokenizer.decode([i]).strip())
                return {"rejected_ids": ids}

            return prepared.map(strip)

    return UnfinishedAwareTrainer


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_completion_ids(tokenizer, ex: PreferenceExample, answer: str) -> tuple[list[int], list[int]]:
    """Same split as TRL's DPO preprocessing: the completion starts where prompt and prompt+answer diverge."""
    if uses_chat_template(tokenizer, ex):
        msgs = ex.prompt_messages()
        prompt_ids = token_ids(tokenizer, msgs, add_generation_prompt=True)
        full_ids = token_ids(tokenizer, msgs + [{"role": "assistant", "content": answer}])
    else:
        eos = tokenizer.eos_token or ""
        text = answer if answer.endswith(eos) else answer + eos
        prompt_ids = token_ids(tokenizer, ex.rendered_prompt())
        full_ids = token_ids(tokenizer, ex.rendered_prompt() + text)
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
            prompt_ids, completion_ids = prompt_completion_ids(tokenizer, ex, answer)
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
    with progress_bars(False):
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    pairs = sequence_logprobs(model, tokenizer, examples)
    return sum(c - r for c, r in pairs) / len(pairs)


# --------------------------------------------------------------------------- training


def _reward_metrics(steps: list[dict[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        values = [float(e[key]) for e in steps if key in e]
        if values:
            metrics[key] = sum(values) / len(values)  # mean over logged steps
            metrics[f"final_{key}"] = values[-1]  # last logged step
    return metrics


def _summarise(log_history: list[dict[str, Any]]) -> dict[str, float]:
    return summarise_history(log_history, step_keys=("loss", "rewards/margins"), step_metrics=_reward_metrics)


def _loss_kwargs(settings: TrainingSettings) -> dict[str, Any]:
    # Iterative RPO (Pang et al. 2024): an NLL term on the chosen answer added to the DPO loss, so
    # the chosen log-prob does not fall while the margin grows. TRL 1.16 has no `rpo_alpha` any
    # more; the same loss is loss_type ["sigmoid", "sft"] with weights [1, rpo_alpha] (the "sft"
    # term is the mean per-token NLL of the chosen answers).
    if not settings.rpo_alpha:
        return {}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float(settings.rpo_alpha)]}


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


def dpo_update(
    base_model_path: str,
    examples: list[PreferenceExample],
    out_dir: str | Path,
    settings: TrainingSettings,
    *,
    seed: int = 0,
    reference_model_path: str | None = None,
    log_callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` with DPO from ``base_model_path``; write the merged model.

    ``settings`` is the config's ``training`` section, taken as it is (like TRL's DPOConfig).

    The checkpoint at ``out_dir`` (written atomically, see workers.checkpoints) holds the merged
    full model + tokenizer as safetensors, and the adapter alone under ``adapter/``. Before the
    checkpoint is committed, the merged model is reloaded from disk and its logits on a probe
    input must match the in-memory merged model (atol 1e-4), otherwise CheckpointError. If
    ``out_dir`` already holds the checkpoint of this update (same parent), it is returned
    without training (``reused=True``). ``max_stacked_adapters``: the lineage adapter's limit
    (workers.lora_training.commit_merged; the stage passes model.vllm_max_stacked_adapters).
    """
    out = Path(out_dir)
    if not examples:
        raise ValueError("dpo_update needs at least one preference example")
    existing = existing_checkpoint(out, base_model_path, CHECKPOINT_KIND)  # a corrupted one raises here
    if existing is not None:
        return TrainResult.from_checkpoint(out, existing, reused=True)
    with progress_bars(progress):
        return _dpo_update(
            base_model_path, examples, out, settings, seed, reference_model_path, log_callback, progress, reporting, state_store, max_stacked_adapters,
        )


def _dpo_update(
    base_model_path: str,
    examples: list[PreferenceExample],
    out: Path,
    settings: TrainingSettings,
    seed: int,
    reference_model_path: str | None,
    log_callback: Callable[[dict[str, Any]], None] | None,
    progress: bool,
    reporting: Mapping[str, Any] | None = None,
    state_store: RemoteTrainerState | None = None,
    max_stacked_adapters: int = 1,
) -> TrainResult:
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    ref_model = None
    if reference_model_path is not None and not _same_path(reference_model_path, base_model_path):
        ref_model = AutoModelForCausalLM.from_pretrained(str(reference_model_path), dtype=torch.float32)

    def expect_adapter_disabled_reference(trainer) -> None:
        if ref_model is None and trainer.ref_model is not None:  # pragma: no cover - guards a TRL behaviour change
            raise RuntimeError("DPOTrainer loaded a separate reference model; expected the adapter-disabled base")

    path, metadata = train_lora_checkpoint(
        base_model_path,
        out,
        settings,
        kind=CHECKPOINT_KIND,
        trainer_cls=unfinished_aware_trainer(DPOTrainer),
        config_cls=DPOConfig,
        config_kwargs={"beta": settings.beta, **_loss_kwargs(settings)},
        rows=lambda tokenizer: trl_records(examples, tokenizer),
        num_examples=len(examples),
        summarise=_summarise,
        seed=seed,
        scratch_prefix="kaizen-dpo-",
        log_callback=log_callback,
        progress=progress,
        # None => the adapter-disabled policy is the reference (see module docstring)
        trainer_kwargs={"ref_model": ref_model},
        check_trainer=expect_adapter_disabled_reference,
        extra_metadata={"reference": str(reference_model_path) if ref_model is not None else "adapter_disabled_parent"},
        reporting=reporting,
        state_store=state_store,
        max_stacked_adapters=max_stacked_adapters,
    )
    return TrainResult.from_checkpoint(path, metadata)
