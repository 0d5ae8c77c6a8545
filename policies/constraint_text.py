"""Text reading shared by the constraint checkers: words, sentences, lines, markdown.

Checkers read answers the way a person grading them would: markdown emphasis, quotes and
punctuation are not words, letter case does not change a word, and surrounding whitespace
does not count. Everything here is pure and deterministic.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Heading marks, emphasis, block quotes, and the opening quote of a quotation-wrapped answer.
_LEADING_MARKDOWN = re.compile(r"^\s*(?:#{1,6}\s+|[*_>\"“]+\s*)*")
_FENCED = re.compile(r"^```[\w-]*[ \t]*\n(?P<body>.*?)\n?```$", re.DOTALL)
DIVIDER_LINE = re.compile(r"^[ \t]*\*{3}[ \t]*$", re.MULTILINE)
TITLE = re.compile(r"<<[^<>\n]*\w[^<>\n]*>>")
_TITLE_OR_DIVIDER_LINE = re.compile(r"^\s*(?:<<[^<>\n]*>>|\*{3,}|-{3,})\s*$")

# A few frequent function words per language, none shared between the lists, so that the
# language of a body of text can be told by counting them (see `dominant_language`).
STOPWORDS: dict[str, frozenset[str]] = {
    "english": frozenset("the and is are of to it that you this with for was".split()),
    "french": frozenset("le les et est des une du pour dans pas avec vous sont au ce".split()),
    "spanish": frozenset("el los las y es del una para con por son muy pero como".split()),
    "german": frozenset("der die das und ist nicht ein eine mit für sind auch ich auf".split()),
}


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters or digits, with inner apostrophes ("don't" is one
    word). Markdown symbols, quotes and punctuation are not words."""
    return _WORD.findall(text.lower())


def count_phrase(text_words: list[str], phrase: str) -> int:
    """How often the words of `phrase` occur, in order and whole, in `text_words`."""
    target = words(phrase)
    if not target:
        return 0
    size = len(target)
    return sum(1 for i in range(len(text_words) - size + 1) if text_words[i : i + size] == target)


def sentences(text: str) -> list[str]:
    """Sentences: each line split after ".", "!" or "?" followed by space. A bullet or a line
    without end punctuation counts as one sentence; title lines (<<...>>) and divider lines
    (***, ---) are not sentences; pieces without a word are dropped."""
    found: list[str] = []
    for line in text.splitlines():
        if _TITLE_OR_DIVIDER_LINE.match(line):
            continue
        found.extend(piece for piece in _SENTENCE_END.split(line) if words(piece))
    return found


def content_lines(text: str) -> list[str]:
    """Non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def without_leading_markdown(line: str) -> str:
    """A line without its heading marks, emphasis stars, underscores, block-quote marks (">") or
    double quotes around it (an answer wrapped whole in quotes starts and ends with one)."""
    return _LEADING_MARKDOWN.sub("", line, count=1).strip().strip("*_\"“”").strip()


def unfenced(text: str) -> str:
    """The body of a text wrapped whole in a ``` code fence, else the stripped text."""
    stripped = text.strip()
    match = _FENCED.match(stripped)
    return match.group("body").strip() if match else stripped


def has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def dominant_language(text: str, min_hits: int = 2) -> str | None:
    """The language in STOPWORDS whose function words occur most in `text`, or None when
    fewer than `min_hits` occur or two languages tie for the most."""
    counts: dict[str, int] = dict.fromkeys(STOPWORDS, 0)
    for word in words(text):
        for language, vocabulary in STOPWORDS.items():
            if word in vocabulary:
                counts[language] += 1
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    best, best_hits = ranked[0]
    if best_hits < min_hits or best_hits == ranked[1][1]:
        return None
    return best
