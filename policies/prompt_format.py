"""How chat messages become the prompt text a model sees: one rule for sampling, judging, training and serving.

``model.prompt_format`` picks the format:

``chat_template``
    The tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=True)``).
    Completions end at the model's EOS / end-of-turn token; no stop strings are needed.
``urial``
    The URIAL in-context format of :mod:`policies.urial` (a preamble, stylistic examples, then
    ``# Query:`` / ``# Answer:``). Made for base models; stops at the next ``# Query:``.
``plain``
    kaizen's plain format for base models, documented here. Each message is one block
    ``"<Role>: <content>"`` (role capitalised: ``System``, ``User``, ``Assistant``; content
    stripped), blocks are joined by one blank line, and a prompt that asks for an answer ends
    with ``"\\n\\nAssistant:"``::

        System: Answer briefly.

        User: What is rain?

        Assistant:

    The answer is the text after ``Assistant:``; it stops where the model starts another turn
    (:data:`PLAIN_STOP_STRINGS`: a line starting with ``User:`` or ``System:``).
``auto`` (default)
    ``chat_template`` when the tokenizer has one, else ``urial``: that is the case URIAL exists for.

Pure: no tokenizer here. ``workers.runtime.ModelRuntime.render_chat`` applies the chosen format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FORMAT_AUTO = "auto"
FORMAT_CHAT_TEMPLATE = "chat_template"
FORMAT_URIAL = "urial"
FORMAT_PLAIN = "plain"
PROMPT_FORMATS = (FORMAT_AUTO, FORMAT_CHAT_TEMPLATE, FORMAT_URIAL, FORMAT_PLAIN)

PLAIN_SEPARATOR = "\n\n"
PLAIN_ANSWER_CUE = "Assistant:"
PLAIN_STOP_STRINGS = ("\nUser:", "\nSystem:")


class PromptFormatError(ValueError):
    """A prompt format the model cannot use; the message names model.prompt_format and the fix."""


def resolve_prompt_format(configured: str, *, has_chat_template: bool) -> str:
    """The concrete format (never ``auto``) for a model with or without a chat template."""
    if configured not in PROMPT_FORMATS:
        raise PromptFormatError(f"model.prompt_format {configured!r} is unknown; use one of {list(PROMPT_FORMATS)}")
    if configured == FORMAT_AUTO:
        return FORMAT_CHAT_TEMPLATE if has_chat_template else FORMAT_URIAL
    if configured == FORMAT_CHAT_TEMPLATE and not has_chat_template:
        raise PromptFormatError(
            "model.prompt_format is chat_template but the tokenizer has no chat template; "
            "set model.prompt_format to auto, urial or plain"
        )
    return configured


def stop_strings_for_format(prompt_format: str) -> tuple[str, ...]:
    """Where a completion in ``prompt_format`` ends (besides EOS)."""
    if prompt_format == FORMAT_URIAL:
        from policies.urial import URIAL_STOP

        return (URIAL_STOP,)
    if prompt_format == FORMAT_PLAIN:
        return PLAIN_STOP_STRINGS
    return ()


def render_plain_prompt(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The plain format (see the module docstring)."""
    blocks = [f"{str(m['role']).capitalize()}: {str(m['content']).strip()}" for m in messages]
    if add_generation_prompt:
        blocks.append(PLAIN_ANSWER_CUE)
    return PLAIN_SEPARATOR.join(blocks)

