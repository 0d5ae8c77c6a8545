"""URIAL: the packaged preset, the exact prompt format, chat handling and the stop cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.urial import (
    URIAL_STOP,
    UrialChatError,
    UrialPreset,
    UrialPresetError,
    cut_at_stop,
    load_urial_preset,
    parse_urial_preset,
    render_urial_prompt,
)

PRESET = UrialPreset(
    version="test-1",
    preamble="You are a careful assistant.",
    examples=(("What is 2 + 2?", "4."), ("Name a colour.", "Blue.")),
)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


# --- The packaged preset -------------------------------------------------------------


def test_packaged_preset_is_versioned_and_has_three_examples_in_our_format():
    preset = load_urial_preset()

    assert preset.version == "kaizen-urial-v1"
    assert len(preset.examples) == 3
    assert preset.preamble and all(q and a for q, a in preset.examples)
    for text in (preset.preamble, *(t for pair in preset.examples for t in pair)):
        assert "# Query:" not in text and "# Answer:" not in text
        assert text == text.strip()


def test_packaged_examples_cover_structure_uncertainty_and_a_polite_refusal():
    answers = [answer for _, answer in load_urial_preset().examples]

    assert "\n1. " in answers[0] and "\n2. " in answers[0]  # a structured, step-by-step answer
    assert "Nobody can tell you" in answers[1]  # honest about what cannot be known
    assert answers[2].startswith("I can't help with that.")  # declines, then offers a safe alternative
    assert "happy to help" in answers[2]


def test_load_with_an_explicit_path_reads_that_file(tmp_path: Path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"version": 7, "preamble": " Be kind. ", "examples": [{"query": "Hi", "answer": "Hello!"}]}))

    assert load_urial_preset(path) == UrialPreset("7", "Be kind.", (("Hi", "Hello!"),))
    assert load_urial_preset(str(path)) == load_urial_preset(path)


# --- Exact rendering -----------------------------------------------------------------


def test_a_multi_turn_chat_renders_exactly_the_documented_format():
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        _user("Hi there"),
        {"role": "assistant", "content": "Hello! How can I help?"},
        _user("  Why is the sky blue?  "),
    ]

    expected = (
        "You are a careful assistant.\n"
        "\n"
        "Answer in one sentence.\n"
        "\n"
        "# Query:\n"
        "What is 2 + 2?\n"
        "\n"
        "# Answer:\n"
        "4.\n"
        "\n"
        "# Query:\n"
        "Name a colour.\n"
        "\n"
        "# Answer:\n"
        "Blue.\n"
        "\n"
        "# Query:\n"
        "Hi there\n"
        "\n"
        "# Answer:\n"
        "Hello! How can I help?\n"
        "\n"
        "# Query:\n"
        "Why is the sky blue?\n"
        "\n"
        "# Answer:\n"
    )
    assert render_urial_prompt(messages, PRESET) == expected


def test_a_single_question_follows_the_preset_examples():
    prompt = render_urial_prompt([_user("What is the boiling point of water?")], PRESET)

    assert prompt == (
        "You are a careful assistant.\n\n"
        "# Query:\nWhat is 2 + 2?\n\n# Answer:\n4.\n\n"
        "# Query:\nName a colour.\n\n# Answer:\nBlue.\n\n"
        "# Query:\nWhat is the boiling point of water?\n\n# Answer:\n"
    )


def test_the_packaged_preset_renders_every_example_then_the_query():
    preset = load_urial_preset()
    prompt = render_urial_prompt([_user("How do vaccines work?")], preset)

    assert prompt.startswith(preset.preamble + "\n\n# Query:\n" + preset.examples[0][0] + "\n\n# Answer:\n")
    assert prompt.endswith("# Query:\nHow do vaccines work?\n\n# Answer:\n")
    assert prompt.count(URIAL_STOP) == len(preset.examples) + 1
    assert prompt.count("# Answer:") == len(preset.examples) + 1


def test_system_and_developer_messages_are_appended_to_the_preamble_in_order():
    messages = [
        {"role": "system", "content": "First rule."},
        _user("Q"),
        {"role": "developer", "content": "Second rule."},
    ]
    messages.append(_user("more"))

    prompt = render_urial_prompt(messages, PRESET)

    assert prompt.startswith("You are a careful assistant.\n\nFirst rule.\n\nSecond rule.\n\n# Query:\nWhat is 2 + 2?")
    assert prompt.endswith("# Query:\nQ\n\nmore\n\n# Answer:\n")  # consecutive user turns merged


def test_text_parts_are_joined_and_consecutive_assistant_turns_merged():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": "A."},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "B."},
        _user("Next?"),
    ]

    prompt = render_urial_prompt(messages, PRESET)

    assert "# Query:\nPart one.\nPart two.\n\n# Answer:\nA.\n\nB.\n\n# Query:\nNext?\n\n# Answer:\n" in prompt


def test_an_empty_system_message_adds_nothing():
    with_empty = render_urial_prompt([{"role": "system", "content": "  "}, _user("Q")], PRESET)

    assert with_empty == render_urial_prompt([_user("Q")], PRESET)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "end with a user message"),
        ([{"role": "system", "content": "Only a system message."}], "end with a user message"),
        ([_user("Q"), {"role": "assistant", "content": "A"}], "end with a user message"),
        ([{"role": "assistant", "content": "I start."}, _user("Q")], "must come from the user"),
        ([{"role": "tool", "content": "{}"}, _user("Q")], "role 'tool'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
        ([{"role": "user", "content": 42}], "must be a string or a list of text parts"),
        (["not a message"], "must be an object"),
    ],
)
def test_chats_that_cannot_be_rendered_raise_a_clear_error(messages, fragment):
    with pytest.raises(UrialChatError, match=fragment):
        render_urial_prompt(messages, PRESET)


# --- Stopping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Blue light scatters more.\n\n# Query:\nAnd at sunset?\n\n# Answer:\nRed.", "Blue light scatters more."),
        ("Blue light scatters more.", "Blue light scatters more."),
        ("Blue light scatters more.\n\n", "Blue light scatters more."),
        ("One.\n\n# Query:\nTwo?\n\n# Query:\nThree?", "One."),
        ("Inline # Query: cut here too", "Inline"),
        # A token limit can stop inside the marker: the partial marker on its own last line goes.
        ("Blue light scatters more.\n\n# Query", "Blue light scatters more."),
        ("Blue light scatters more.\n\n# Q", "Blue light scatters more."),
        ("Blue light scatters more.\n\n#", "Blue light scatters more."),
        ("# Que", ""),
        ("# Query:", ""),
        ("", ""),
        # Not a partial marker: it does not start a line, or it is not a prefix of "# Query:".
        ("I program in C#", "I program in C#"),
        ("Use a heading:\n# Queries", "Use a heading:\n# Queries"),
        ("Steps:\n# Answer", "Steps:\n# Answer"),
    ],
)
def test_cut_at_stop(completion, expected):
    assert cut_at_stop(completion) == expected


def test_the_stop_marker_is_what_the_next_example_would_start_with():
    prompt = render_urial_prompt([_user("Q1"), {"role": "assistant", "content": "A1"}, _user("Q2")], PRESET)
    # Whatever the model invents after its answer begins with the marker, so cutting there keeps just the answer.
    invented = "A2\n\n" + prompt.split("A1\n\n", 1)[1]
    assert invented.split("\n\n", 1)[1].startswith(URIAL_STOP)
    assert cut_at_stop(invented) == "A2"


# --- Malformed preset files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: [unclosed", "invalid YAML at line 1"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("preamble: p\nexamples: [{query: q, answer: a}]\n", "version must be non-empty text"),
        ("version: v\npreamble: ''\nexamples: [{query: q, answer: a}]\n", "preamble must be non-empty text"),
        ("version: v\npreamble: p\nexamples: []\n", "examples must be a non-empty list"),
        ("version: v\npreamble: p\nexamples: [{query: q}]\n", r"examples\[0\] must have exactly the keys query and answer"),
        ("version: v\npreamble: p\nexamples: [{query: q, answer: a, note: n}]\n", "exactly the keys"),
        ("version: v\npreamble: p\nexamples: [{query: q, answer: 3}]\n", r"examples\[0\].answer must be non-empty text"),
        ("version: v\npreamble: p\nexamples: [{query: q, answer: 'a\n\n  # Query: b'}]\n", r"examples\[0\].answer contains '# Query:'"),
        ("version: v\npreamble: 'see # Answer: below'\nexamples: [{query: q, answer: a}]\n", "preamble contains '# Answer:'"),
        ("version: v\npreamble: p\nexamples: [{query: q, answer: a}]\nextra: 1\n", r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_a_malformed_preset_file_names_the_file_and_the_problem(tmp_path: Path, text, fragment):
    path = tmp_path / "preset.yaml"
    path.write_text(text)

    with pytest.raises(UrialPresetError, match=fragment) as info:
        load_urial_preset(path)
    assert str(path) in str(info.value)


def test_a_missing_preset_file_says_it_cannot_be_read(tmp_path: Path):
    with pytest.raises(UrialPresetError, match="cannot read the file"):
        load_urial_preset(tmp_path / "nope.yaml")


def test_parse_preset_from_text_strips_whitespace():
    preset = parse_urial_preset("version: ' v2 '\npreamble: |\n  Hello.\n\nexamples:\n  - query: ' Q '\n    answer: |\n      A\n")

    assert preset == UrialPreset("v2", "Hello.", (("Q", "A"),))
