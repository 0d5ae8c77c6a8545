"""A checkpoint's model profile (``policies.model_profile``) read off its config and tokenizer.

:func:`profile_of` works on loaded objects (the runtime calls it once per load);
:func:`checkpoint_profile` reads a checkpoint directory's files (what the lineage records for a
new checkpoint). The checks a model must pass first live in ``workers.model_checks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policies.model_profile import ModelProfile, context_length_from
from policies.prompt_format import resolve_prompt_format, stop_strings_for_format

# The config attributes different architectures use for the number of positions.
_POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def config_positions(config: Any) -> int | None:
    for name in _POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(config: Any, generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a completion: the generation config's, else the model config's, else the tokenizer's."""
    for source in (generation_config, config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def profile_of(
    config: Any, tokenizer: Any, *, generation_config: Any = None, prompt_format: str = "auto", context_length: int | None = None
) -> ModelProfile:
    """The profile of a model from its config, generation config and tokenizer (raises ValueError)."""
    length, source = context_length_from(
        override=context_length,
        config_positions=config_positions(config),
        tokenizer_max_length=getattr(tokenizer, "model_max_length", None),
    )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    resolved = resolve_prompt_format(prompt_format, has_chat_template=has_template)
    return ModelProfile(
        context_length=length,
        context_source=source,
        has_chat_template=has_template,
        prompt_format=resolved,
        eos_token_ids=eos_token_ids(config, generation_config, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=stop_strings_for_format(resolved),
    )


def checkpoint_profile(path: str, *, prompt_format: str = "auto", context_length: int | None = None, **_: Any) -> ModelProfile:
    """The profile of the checkpoint at ``path`` from its files alone (config, generation config,
    tokenizer; no weights): what is recorded with a new checkpoint in the lineage DB."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:  # a checkpoint saved without generation_config.json
        generation_config = None
    return profile_of(
        AutoConfig.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)), generation_config=generation_config,
        prompt_format=prompt_format, context_length=context_length,
    )


def training_max_length(max_length: int, config: Any, tokenizer: Any) -> int:
    """A trainer's ``max_length`` kept inside the model's context (positions past it do not exist)."""
    positions = config_positions(config)
    if positions is None:
        limit = getattr(tokenizer, "model_max_length", None)
        positions = limit if isinstance(limit, int) and 0 < limit < 10**9 else None
    return min(max_length, positions) if positions else max_length


