"""URIAL: aligned answers from a base model with no tuning, by in-context examples alone.

Following Lin et al., "The Unlocking Spell on Base LLMs: Rethinking Alignment via In-Context
Learning" (2023), a base model is shown a system preamble and a few stylistic query/answer
examples, then the user's query, and it continues with an answer in the same style. The
examples are kaizen's own (``policies/data/urial/v1.yaml``); a user can point the server at a
replacement file with the same structure (see that file's header for the rules).

Exact prompt format
    Every text below is stripped of leading and trailing whitespace, and the blocks are
    joined by one blank line (``"\\n\\n"``)::

        <preamble>

        <system message 1>            (each system/developer message of the chat, in order)

        # Query:
        <preset example 1 query>

        # Answer:
        <preset example 1 answer>

        ...                           (every preset example, in file order)

        # Query:
        <earlier user turn 1>

        # Answer:
        <earlier assistant turn 1>

        ...                           (every earlier user/assistant exchange of the chat)

        # Query:
        <last user message>

        # Answer:
        <- the prompt ends here, with "# Answer:" followed by a single "\\n"

    In code: ``"\\n\\n".join([preamble, *systems, *blocks, "# Query:\\n" + query, "# Answer:\\n"])``
    where each example ``block`` is ``"# Query:\\n" + q + "\\n\\n# Answer:\\n" + a``.

Chat rules
    ``messages`` are in OpenAI chat format (``role`` and ``content``; content is a string or a
    list of ``{"type": "text", "text": ...}`` parts, joined with newlines). ``system`` and
    ``developer`` messages are appended to the preamble wherever they appear. The remaining
    turns must alternate user/assistant and end with a user message; consecutive messages of
    the same role are merged (joined by a blank line). Message text is inserted verbatim: a
    user who writes ``# Query:`` into their own message only confuses their own answer.

Stopping
    Generation stops at the next ``# Query:`` (:data:`URIAL_STOP`), where the model starts to
    invent the user's next turn. :func:`cut_at_stop` applies the same cut to finished text,
    also removing a partial marker (a last line such as ``# Que``) left by a token limit, and
    the blank line before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from policies.yaml_errors import describe_yaml_error

URIAL_STOP = "# Query:"
ANSWER_MARKER = "# Answer:"
DEFAULT_PRESET_RESOURCE = "data/urial/v1.yaml"

_BLOCK_SEPARATOR = "\n\n"
_SYSTEM_ROLES = frozenset({"system", "developer"})
_TURN_ROLES = frozenset({"user", "assistant"})
_MARKERS = (URIAL_STOP, ANSWER_MARKER)


class UrialPresetError(ValueError):
    """A URIAL preset file that cannot be used; the message names the file and the field."""


class UrialChatError(ValueError):
    """A chat that cannot be rendered as a URIAL prompt; the message says what to change."""


@dataclass(frozen=True)
class UrialPreset:
    """A versioned URIAL prompt set: the preamble and the (query, answer) examples."""

    version: str
    preamble: str
    examples: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- presets


def load_urial_preset(path: str | Path | None = None) -> UrialPreset:
    """Read a preset file (YAML or JSON); ``None`` reads kaizen's packaged v1.

    Raises :class:`UrialPresetError` naming the file and the offending field when the file is
    missing, unparseable or does not follow the structure of ``policies/data/urial/v1.yaml``.
    """
    if path is None:
        source = f"policies/{DEFAULT_PRESET_RESOURCE}"
        text = resources.files("policies").joinpath(DEFAULT_PRESET_RESOURCE).read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UrialPresetError(f"URIAL preset {source}: cannot read the file ({exc})") from None
    return parse_urial_preset(text, source=source)


def parse_urial_preset(text: str, *, source: str = "<string>") -> UrialPreset:
    """Build a preset from the text of a preset file (YAML; JSON is valid YAML)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UrialPresetError(f"URIAL preset {source}: invalid YAML{describe_yaml_error(exc)}") from None
    if not isinstance(raw, Mapping):
        raise UrialPresetError(f"URIAL preset {source}: the top level must be a mapping with version, preamble and examples")
    unknown = sorted(set(map(str, raw)) - {"version", "preamble", "examples"})
    if unknown:
        raise UrialPresetError(f"URIAL preset {source}: unknown key(s) {unknown}; allowed: ['examples', 'preamble', 'version']")
    version = _required_text(raw, "version", source)
    preamble = _required_text(raw, "preamble", source)
    examples = raw.get("examples")
    if not isinstance(examples, list) or not examples:
        raise UrialPresetError(f"URIAL preset {source}: examples must be a non-empty list of {{query, answer}} entries")
    pairs = tuple(_example(entry, index, source) for index, entry in enumerate(examples))
    return UrialPreset(version=version, preamble=preamble, examples=pairs)


def _required_text(raw: Mapping[str, Any], key: str, source: str) -> str:
    value = raw.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "version":
        value = str(value)  # "version: 2" is a fine version name
    if not isinstance(value, str) or not value.strip():
        raise UrialPresetError(f"URIAL preset {source}: {key} must be non-empty text, got {value!r}")
    _refuse_markers(value, key, source)
    return value.strip()


def _example(entry: Any, index: int, source: str) -> tuple[str, str]:
    where = f"examples[{index}]"
    if not isinstance(entry, Mapping) or set(map(str, entry)) != {"query", "answer"}:
        keys = sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__
        raise UrialPresetError(f"URIAL preset {source}: {where} must have exactly the keys query and answer, got {keys}")
    return _example_text(entry, "query", where, source), _example_text(entry, "answer", where, source)


def _example_text(entry: Mapping[str, Any], key: str, where: str, source: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UrialPresetError(f"URIAL preset {source}: {where}.{key} must be non-empty text, got {value!r}")
    _refuse_markers(value, f"{where}.{key}", source)
    return value.strip()


def _refuse_markers(text: str, field: str, source: str) -> None:
    for marker in _MARKERS:
        if marker in text:
            raise UrialPresetError(
                f"URIAL preset {source}: {field} contains {marker!r}, which delimits the examples; "
                "reword it (e.g. 'Query:' without the '# ')"
            )


# --------------------------------------------------------------------------- rendering


def render_urial_prompt(messages: list[dict], preset: UrialPreset, *, drop_examples: int = 0) -> str:
    """The URIAL prompt for an OpenAI-format chat (exact format in the module docstring).

    ``drop_examples`` leaves out that many preset examples from the front: how a prompt too long
    for a small context window is shortened while the chat itself is kept whole.
    """
    systems, turns = _split_chat(messages)
    if not turns or turns[-1][0] != "user":
        raise UrialChatError("a URIAL prompt needs the chat to end with a user message (the query to answer)")
    if turns[0][0] != "user":
        raise UrialChatError("the chat's first non-system message must come from the user, not the assistant")
    exchanges = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    blocks = [_example_block(q, a) for q, a in (*preset.examples[max(0, drop_examples) :], *exchanges)]
    query = turns[-1][1]
    parts = [preset.preamble.strip(), *systems, *blocks, f"{URIAL_STOP}\n{query}", f"{ANSWER_MARKER}\n"]
    return _BLOCK_SEPARATOR.join(parts)


def _example_block(query: str, answer: str) -> str:
    return f"{URIAL_STOP}\n{query.strip()}{_BLOCK_SEPARATOR}{ANSWER_MARKER}\n{answer.strip()}"


def _split_chat(messages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple[str, str]]]:
    """System texts, and the user/assistant turns with same-role runs merged."""
    systems: list[str] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UrialChatError(f"messages[{index}] must be an object with role and content")
        role = message.get("role")
        text = _content_text(message.get("content"), index).strip()
        if role in _SYSTEM_ROLES:
            if text:
                systems.append(text)
        elif role in _TURN_ROLES:
            if turns and turns[-1][0] == role:
                turns[-1] = (role, f"{turns[-1][1]}{_BLOCK_SEPARATOR}{text}".strip())
            else:
                turns.append((str(role), text))
        else:
            raise UrialChatError(
                f"messages[{index}].role {role!r} cannot be rendered as a URIAL example; "
                "allowed roles: system, developer, user, assistant"
            )
    return systems, turns


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UrialChatError(f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise UrialChatError(f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}")


# --------------------------------------------------------------------------- stopping


def cut_at_stop(completion: str) -> str:
    """The answer part of a URIAL completion: up to the first ``# Query:``, trailing whitespace removed.

    A last line that is the start of the marker (``#``, ``# Q``, ``# Query``: what a token
    limit leaves) is removed too. It must start a line, so ``"I use C#"`` is kept whole.
    """
    cut = completion.find(URIAL_STOP)
    text = completion if cut < 0 else completion[:cut]
    if cut < 0:
        line_start = text.rfind("\n") + 1
        last_line = text[line_start:]
        if last_line and URIAL_STOP.startswith(last_line):
            text = text[:line_start]
    return text.rstrip()
