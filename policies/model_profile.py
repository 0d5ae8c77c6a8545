"""What kaizen needs to know about a model before it renders a prompt for it: its profile.

A :class:`ModelProfile` is computed once per checkpoint (``workers.model_profile``) from the
model config and tokenizer, recorded with the checkpoint in the lineage DB, and consulted for
every prompt: its context length bounds ``prompt tokens + max_new_tokens``, its prompt format
says how chat messages become text (:mod:`policies.prompt_format`), and its stop strings end a
completion where that format starts the next turn.

This module is pure: the profile is plain data and :func:`check_context` is arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CONTEXT_SOURCES = ("model.context_length", "config", "tokenizer.model_max_length")


class ContextLengthExceeded(ValueError):
    """A prompt plus the tokens to generate does not fit the model's context window.

    The server answers it with OpenAI's 400 ``context_length_exceeded``; the loop truncates or
    skips the item and counts it.
    """

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context_length = prompt_tokens, max_new_tokens, context_length
        super().__init__(
            f"this model's maximum context length is {context_length} tokens, but the prompt is {prompt_tokens} tokens "
            f"and {max_new_tokens} more were requested ({prompt_tokens + max_new_tokens} in all); "
            "shorten the prompt or lower max_tokens"
        )


@dataclass(frozen=True)
class ModelProfile:
    """The facts about one checkpoint that decide how it is prompted.

    ``context_source`` says where ``context_length`` came from (one of :data:`CONTEXT_SOURCES`).
    ``prompt_format`` is resolved: ``chat_template``, ``urial`` or ``plain``, never ``auto``.
    """

    context_length: int
    context_source: str
    has_chat_template: bool
    prompt_format: str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    stop_strings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as stored in the lineage DB."""
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["stop_strings"] = list(self.stop_strings)
        return out


def check_context(profile: ModelProfile, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise :class:`ContextLengthExceeded` unless ``prompt_tokens + max_new_tokens`` fits the context."""
    if prompt_tokens + max_new_tokens > profile.context_length:
        raise ContextLengthExceeded(prompt_tokens, max_new_tokens, profile.context_length)


def fits_context(profile: ModelProfile, prompt_tokens: int, max_new_tokens: int) -> bool:
    return prompt_tokens + max_new_tokens <= profile.context_length


def context_length_from(
    *, override: int | None, config_positions: int | None, tokenizer_max_length: int | None
) -> tuple[int, str]:
    """(context length, its source): the configured override, else the model config's position
    count, else the tokenizer's ``model_max_length``. A tokenizer's "no limit" sentinel (a huge
    number, transformers' VERY_LARGE_INTEGER) is not a limit."""
    if override is not None:
        return int(override), CONTEXT_SOURCES[0]
    if config_positions is not None and config_positions > 0:
        return int(config_positions), CONTEXT_SOURCES[1]
    if tokenizer_max_length is not None and 0 < tokenizer_max_length < 10**9:
        return int(tokenizer_max_length), CONTEXT_SOURCES[2]
    raise ValueError(
        "cannot tell this model's context length: its config has no max_position_embeddings (or n_positions) and its "
        "tokenizer sets no model_max_length; set model.context_length"
    )
