"""Looping answers: a line or a phrase repeated until the token budget cuts the answer.

A small model that cannot end an answer often falls into a loop ("[name]" lines, "Section X"
lines), and such a loop can pass format checks (placeholders, numbered sections) while saying
nothing. Measured on the improvement demo: a champion repeated one line 3 or more times in 90
of 240 instruct-checks answers, the initial model in 23. These pure checks find such answers so
that suites can score them as failing (eval.count_as_failing) and pairs never choose them
(pairs.reject_loops).

Only lines with a letter or digit count: a separator such as "***" between paragraphs is what a
constraint asks for, not a loop.
"""

from __future__ import annotations

import re
from collections import Counter

# Three copies: "repeat the request" and "two responses" legitimately give two.
MIN_REPEATS = 3
# Eight words: a loop inside a line ("and then the and then the ...") repeats far more; prose
# repeats an eight-word run three times almost never.
PHRASE_WORDS = 8

_WORD = re.compile(r"\w+")


def _content_lines(text: str) -> list[str]:
    lines = (" ".join(line.lower().split()) for line in text.splitlines())
    return [line for line in lines if any(ch.isalnum() for ch in line)]


def repeated_line(text: str, min_repeats: int = MIN_REPEATS) -> str | None:
    """The most repeated line (case and spacing ignored) when it occurs `min_repeats` times or more."""
    counts = Counter(_content_lines(text))
    if not counts:
        return None
    line, count = counts.most_common(1)[0]
    return line if count >= min_repeats else None


def repeated_phrase(text: str, words: int = PHRASE_WORDS, min_repeats: int = MIN_REPEATS) -> str | None:
    """A run of `words` words (case ignored) that occurs `min_repeats` times or more without overlapping."""
    tokens = _WORD.findall(text.lower())
    last_start: dict[tuple[str, ...], int] = {}
    counts: Counter[tuple[str, ...]] = Counter()
    for start in range(len(tokens) - words + 1):
        gram = tuple(tokens[start:start + words])
        if start - last_start.get(gram, -words) >= words:
            counts[gram] += 1
            last_start[gram] = start
            if counts[gram] >= min_repeats:
                return " ".join(gram)
    return None


def loops(text: str) -> bool:
    """Whether the answer repeats a line or an eight-word phrase three times or more."""
    return repeated_line(text) is not None or repeated_phrase(text) is not None
