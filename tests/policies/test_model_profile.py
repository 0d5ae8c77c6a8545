"""The pure half of the model profile: context arithmetic, context-length sources, prompt formats."""

from __future__ import annotations

import pytest

from policies.model_profile import ContextLengthExceeded, ModelProfile, check_context, context_length_from, fits_context
from policies.prompt_format import PLAIN_STOP_STRINGS, PromptFormatError, render_plain_prompt, resolve_prompt_format, stop_strings_for_format
from policies.urial import URIAL_STOP, load_urial_preset, render_urial_prompt


def profile(context_length: int = 256) -> ModelProfile:
    return ModelProfile(context_length, "config", False, "plain", (2,), None, 1, PLAIN_STOP_STRINGS)


def test_check_context_allows_exactly_the_window_and_names_the_limit_beyond_it() -> None:
    check_context(profile(), 200, 56)
    assert fits_context(profile(), 200, 56) and not fits_context(profile(), 201, 56)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 256 tokens") as raised:
        check_context(profile(), 201, 56)
    assert (raised.value.prompt_tokens, raised.value.max_new_tokens, raised.value.code) == (201, 56, "context_length_exceeded")


def test_context_length_comes_from_the_override_then_the_config_then_the_tokenizer() -> None:
    assert context_length_from(override=128, config_positions=1024, tokenizer_max_length=512) == (128, "model.context_length")
    assert context_length_from(override=None, config_positions=1024, tokenizer_max_length=512) == (1024, "config")
    assert context_length_from(override=None, config_positions=None, tokenizer_max_length=512) == (512, "tokenizer.model_max_length")
    with pytest.raises(ValueError, match="set model.context_length"):
        # transformers' "no limit" sentinel is not a limit
        context_length_from(override=None, config_positions=None, tokenizer_max_length=int(1e30))


def test_auto_is_the_chat_template_or_urial_and_a_missing_template_is_refused() -> None:
    assert resolve_prompt_format("auto", has_chat_template=True) == "chat_template"
    assert resolve_prompt_format("auto", has_chat_template=False) == "urial"
    assert resolve_prompt_format("plain", has_chat_template=True) == "plain"
    with pytest.raises(PromptFormatError, match="model.prompt_format"):
        resolve_prompt_format("chat_template", has_chat_template=False)
    assert stop_strings_for_format("urial") == (URIAL_STOP,) and stop_strings_for_format("chat_template") == ()


def test_the_plain_format_is_role_blocks_ending_with_the_answer_cue() -> None:
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is rain?"}]
    assert render_plain_prompt(messages) == "System: Be brief.\n\nUser: What is rain?\n\nAssistant:"
    assert render_plain_prompt(messages, add_generation_prompt=False) == "System: Be brief.\n\nUser: What is rain?"
    # An invented next turn starts with a stop string.
    assert any(stop in "Rain is water.\n\nUser: and snow?" for stop in PLAIN_STOP_STRINGS)


def test_urial_drops_the_oldest_examples_first_and_keeps_the_chat() -> None:
    preset = load_urial_preset()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    full, shorter = render_urial_prompt(chat, preset), render_urial_prompt(chat, preset, drop_examples=1)
    assert full.count(URIAL_STOP) == len(preset.examples) + 2 and shorter.count(URIAL_STOP) == len(preset.examples) + 1
    assert preset.examples[0][0] in full and preset.examples[0][0] not in shorter and preset.examples[1][0] in shorter
    assert shorter.endswith("# Query:\nHi\n\n# Answer:\nHello!\n\n# Query:\nBye\n\n# Answer:\n")
