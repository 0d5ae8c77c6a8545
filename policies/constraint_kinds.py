"""The verifiable-constraint kinds: for each, the instruction sentence, a pure checker and a
random parameter sampler. `policies.constraints` is the public face; this is the catalogue.

Conventions every checker follows (the public `policies.constraints.check` adds one more:
an empty answer satisfies nothing):
- words are compared lower-cased and whole, ignoring punctuation and markdown
  (`constraint_text.words`), so "**Sure**, here" starts with the phrase "sure";
- surrounding whitespace never matters; a ``` fence around a whole JSON answer is allowed.

Several kinds are meant to be satisfied by chance now and then by a small model's sampled
answers (word limits, lowercase, no commas, common keywords, usual closing phrases), which
is what gives N samples of one prompt a contrast to learn from. Parameter pools are tuples
so sampling is deterministic for a given `random.Random` state.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from policies import constraint_text as ct

Params = Mapping[str, Any]


@dataclass(frozen=True)
class ConstraintKind:
    name: str
    describe: Callable[[Params], str]
    check: Callable[[Params, str], bool]
    sample: Callable[[random.Random], dict[str, Any]]
    param_names: tuple[str, ...] = ()
    conflicts_with: frozenset[str] = frozenset()
    # True when the parameters come from the task itself (repeat_request): such a kind is
    # only sampled when the task is known.
    needs_task: bool = False
    # The fewest answer tokens that can satisfy it (a rough floor, for drawing training
    # constraints that fit the generation budget; see policies.verifiable.attach_constraints).
    min_tokens: Callable[[Params], int] = lambda p: 0


INCLUDE_WORDS = ("important", "example", "simple", "time", "people", "help", "first", "best",
                 "because", "easy", "always", "way", "use", "make", "good")
EXCLUDE_WORDS = ("very", "really", "just", "thing", "things", "also", "lot", "basically",
                 "actually", "stuff", "many", "great")
START_PHRASES = ("Sure", "Certainly", "Here is my answer", "Great question", "In short",
                 "My answer is", "Let me explain", "To begin")
END_PHRASES = ("I hope this helps", "Let me know if you have any other questions",
               "Is there anything else I can help with?", "That is all", "Good luck", "Thank you")
LANGUAGES = ("English", "English", "English", "French", "Spanish", "German")
POSTSCRIPTS = ("P.S.", "P.S.", "P.S.", "P.P.S.")


def _quoted_list(items: tuple[str, ...], joiner: str) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {joiner} " + quoted[-1]


# --- Length ---------------------------------------------------------------------------


def _max_words(p: Params, text: str) -> bool:
    return len(ct.words(text)) <= p["n"]


def _min_words(p: Params, text: str) -> bool:
    return len(ct.words(text)) >= p["n"]


def _max_sentences(p: Params, text: str) -> bool:
    return len(ct.sentences(text)) <= p["n"]


def _min_sentences(p: Params, text: str) -> bool:
    return len(ct.sentences(text)) >= p["n"]


# --- Keywords -------------------------------------------------------------------------


def _include_keywords(p: Params, text: str) -> bool:
    found = ct.words(text)
    return all(ct.count_phrase(found, keyword) > 0 for keyword in p["keywords"])


def _exclude_keywords(p: Params, text: str) -> bool:
    found = ct.words(text)
    return all(ct.count_phrase(found, keyword) == 0 for keyword in p["keywords"])


def _keyword_frequency(p: Params, text: str) -> bool:
    return ct.count_phrase(ct.words(text), p["keyword"]) >= p["n"]


def _sample_keywords(pool: tuple[str, ...]) -> Callable[[random.Random], dict[str, Any]]:
    def sample(rng: random.Random) -> dict[str, Any]:
        return {"keywords": tuple(rng.sample(pool, rng.choice((1, 1, 2))))}

    return sample


# --- Case and punctuation -------------------------------------------------------------


def _lowercase(p: Params, text: str) -> bool:
    return ct.has_letter(text) and not any(ch.isupper() for ch in text)


def _uppercase(p: Params, text: str) -> bool:
    return ct.has_letter(text) and not any(ch.islower() for ch in text)


def _no_commas(p: Params, text: str) -> bool:
    return not any(comma in text for comma in (",", "，", "、"))


# --- Structure ------------------------------------------------------------------------

# An optional opening quote: a quotation-wrapped answer's first line starts with it.
_BULLET = re.compile(r"^[ \t]*[\"“]?[ \t]*[*\-•+][ \t]+\S", re.MULTILINE)
_SECTION = re.compile(r"^[ \t]*[\"“]?[#*_]*[ \t]*section[ \t]+(\d+)\b", re.MULTILINE | re.IGNORECASE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\w[^\[\]\n]*\](?!\()")
_BOLD = re.compile(r"\*\*([^*\n]+?)\*\*")
_ITALIC = re.compile(r"(?<!\*)\*(?![\s*])([^*\n]+?)(?<![\s*])\*(?!\*)")
_RESPONSE_SEPARATOR = re.compile(r"(?<!\*)\*{6}(?!\*)")


def _bullet_points(p: Params, text: str) -> bool:
    return len(_BULLET.findall(text)) == p["n"]


def _paragraphs(p: Params, text: str) -> bool:
    body = text.strip()
    splitter = ct.DIVIDER_LINE if ct.DIVIDER_LINE.search(body) else _BLANK_LINES
    chunks = splitter.split(body)
    return len(chunks) == p["n"] and all(ct.words(chunk) for chunk in chunks)


def _numbered_sections(p: Params, text: str) -> bool:
    numbers = [int(number) for number in _SECTION.findall(text)]
    return numbers == list(range(1, p["n"] + 1))


def _title(p: Params, text: str) -> bool:
    return ct.TITLE.search(text) is not None


def _json_output(p: Params, text: str) -> bool:
    try:
        value = json.loads(ct.unfenced(text))
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _placeholders(p: Params, text: str) -> bool:
    return len(_PLACEHOLDER.findall(text)) >= p["n"]


def _highlights(p: Params, text: str) -> bool:
    bold = [span for span in _BOLD.findall(text) if ct.words(span)]
    rest = _BOLD.sub(" ", text)
    italic = [span for span in _ITALIC.findall(rest) if ct.words(span)]
    return len(bold) + len(italic) >= p["n"]


def _two_responses(p: Params, text: str) -> bool:
    parts = _RESPONSE_SEPARATOR.split(text)
    if len(parts) != 2 or not all(ct.words(part) for part in parts):
        return False
    return ct.words(parts[0]) != ct.words(parts[1])


# --- Openings, endings, wrappers ------------------------------------------------------


def _starts_with_words(text: str, phrase: str) -> bool:
    target = ct.words(phrase)
    return bool(target) and ct.words(text)[: len(target)] == target


def _start_with(p: Params, text: str) -> bool:
    return _starts_with_words(text, p["phrase"])


def _end_with(p: Params, text: str) -> bool:
    target = ct.words(p["phrase"])
    return bool(target) and ct.words(text)[-len(target) :] == target


def _quotation(p: Params, text: str) -> bool:
    body = text.strip()
    return len(body) >= 2 and body[0] in '"“' and body[-1] in '"”' and bool(ct.words(body))


def _postscript(p: Params, text: str) -> bool:
    letters = r"\.\s*".join(re.escape(ch) for ch in p["marker"].replace(".", "").strip())
    marker = re.compile(rf"^{letters}\.?(?P<rest>.*)$", re.IGNORECASE)
    lines = ct.content_lines(text)
    for index, line in enumerate(lines):
        match = marker.match(ct.without_leading_markdown(line))
        # A postscript follows the answer and says something.
        if match and index > 0 and ct.words(match.group("rest")):
            return True
    return False


def _language_marker(p: Params, text: str) -> bool:
    lines = ct.content_lines(text)
    if not lines:
        return False
    header = re.fullmatch(r"language\s*:\s*(\w+)\.?", ct.without_leading_markdown(lines[0]), re.IGNORECASE)
    if header is None or header.group(1).lower() != p["language"].lower():
        return False
    return ct.dominant_language("\n".join(lines[1:])) == p["language"].lower()


def _repeat_request(p: Params, text: str) -> bool:
    request = ct.words(p["request"])
    return _starts_with_words(text, p["request"]) and len(ct.words(text)) > len(request)


def _choice(name: str, pool: tuple[Any, ...]) -> Callable[[random.Random], dict[str, Any]]:
    return lambda rng: {name: rng.choice(pool)}


def _no_params(rng: random.Random) -> dict[str, Any]:
    return {}


_DEFINITIONS: tuple[ConstraintKind, ...] = (
    ConstraintKind("max_words", lambda p: f"Answer in at most {p['n']} words.", _max_words,
                   _choice("n", (20, 30, 40, 60, 80, 100)), ("n",)),
    ConstraintKind("min_words", lambda p: f"Answer in at least {p['n']} words.", _min_words,
                   _choice("n", (30, 50, 80, 120)), ("n",)),
    ConstraintKind("max_sentences", lambda p: f"Use at most {p['n']} sentences.", _max_sentences,
                   _choice("n", (2, 3, 4, 5)), ("n",)),
    ConstraintKind("min_sentences", lambda p: f"Use at least {p['n']} sentences.", _min_sentences,
                   _choice("n", (3, 4, 5, 6)), ("n",)),
    ConstraintKind("include_keywords",
                   lambda p: f"Include the word{'s' if len(p['keywords']) > 1 else ''} "
                   f"{_quoted_list(p['keywords'], 'and')} in your answer.",
                   _include_keywords, _sample_keywords(INCLUDE_WORDS), ("keywords",)),
    ConstraintKind("exclude_keywords",
                   lambda p: f"Do not use the word{'s' if len(p['keywords']) > 1 else ''} "
                   f"{_quoted_list(p['keywords'], 'or')}.",
                   _exclude_keywords, _sample_keywords(EXCLUDE_WORDS), ("keywords",)),
    ConstraintKind("keyword_frequency",
                   lambda p: f"Use the word \"{p['keyword']}\" at least {p['n']} times.", _keyword_frequency,
                   lambda rng: {"keyword": rng.choice(INCLUDE_WORDS), "n": rng.choice((2, 3, 4))},
                   ("keyword", "n")),
    ConstraintKind("lowercase", lambda p: "Write your whole answer in lowercase letters, with no capital letters.",
                   _lowercase, _no_params),
    ConstraintKind("uppercase", lambda p: "Write your whole answer in capital letters.", _uppercase, _no_params),
    ConstraintKind("no_commas", lambda p: "Do not use any commas.", _no_commas, _no_params),
    ConstraintKind("bullet_points",
                   lambda p: f"Your answer must contain exactly {p['n']} bullet points, each on its own line "
                   "starting with \"* \".", _bullet_points, _choice("n", (2, 3, 4, 5)), ("n",)),
    ConstraintKind("paragraphs",
                   lambda p: f"Write exactly {p['n']} paragraphs, separated from each other by a line "
                   "containing only ***.", _paragraphs, _choice("n", (2, 3, 4)), ("n",)),
    ConstraintKind("numbered_sections",
                   lambda p: f"Divide your answer into exactly {p['n']} sections; start each one with a line "
                   "\"Section X\", where X is its number (Section 1, Section 2, ...).",
                   _numbered_sections, _choice("n", (2, 3, 4)), ("n",)),
    ConstraintKind("title", lambda p: "Give your answer a title wrapped in double angular brackets, "
                   "such as <<my title>>.", _title, _no_params),
    ConstraintKind("json_output", lambda p: "Format your whole answer as valid JSON.", _json_output, _no_params),
    ConstraintKind("start_with", lambda p: f"Begin your answer with the words \"{p['phrase']}\".", _start_with,
                   _choice("phrase", START_PHRASES), ("phrase",)),
    ConstraintKind("end_with", lambda p: f"End your answer with the words \"{p['phrase']}\", "
                   "with nothing after them.", _end_with, _choice("phrase", END_PHRASES), ("phrase",)),
    ConstraintKind("quotation", lambda p: "Wrap your whole answer in double quotation marks.", _quotation,
                   _no_params),
    ConstraintKind("postscript", lambda p: f"At the end of your answer, add a postscript starting with "
                   f"{p['marker']}", _postscript, _choice("marker", POSTSCRIPTS), ("marker",)),
    ConstraintKind("placeholders",
                   lambda p: f"Include at least {p['n']} placeholder{'s' if p['n'] > 1 else ''} in square "
                   "brackets, such as [name].", _placeholders, _choice("n", (1, 2, 3)), ("n",)),
    ConstraintKind("language_marker",
                   lambda p: f"Write your answer in {p['language']}, and make its first line "
                   f"\"Language: {p['language']}\".", _language_marker, _choice("language", LANGUAGES),
                   ("language",)),
    ConstraintKind("repeat_request", lambda p: "First repeat the request above word for word without change "
                   "(not this sentence), then give your answer.", _repeat_request, _no_params, ("request",),
                   needs_task=True),
    ConstraintKind("two_responses", lambda p: "Give two different responses, separated by a line of six "
                   "asterisks: ******.", _two_responses, _no_params),
    ConstraintKind("highlights",
                   lambda p: f"Highlight at least {p['n']} part{'s' if p['n'] > 1 else ''} of your answer "
                   "with markdown, like *this highlighted part*.", _highlights, _choice("n", (1, 2, 3)), ("n",)),
)

# Kinds that cannot sensibly hold together in one prompt (symmetric by construction below).
_STRUCTURE = ("bullet_points", "paragraphs", "numbered_sections", "two_responses")
_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("max_words", "min_words"), ("max_sentences", "min_sentences"),
    ("max_words", "min_sentences"), ("min_words", "max_sentences"),
    ("max_words", "numbered_sections"), ("max_words", "two_responses"),
    *((sentence_limit, kind) for sentence_limit in ("max_sentences", "min_sentences") for kind in _STRUCTURE),
    *((a, b) for i, a in enumerate(_STRUCTURE) for b in _STRUCTURE[i + 1 :]),
    ("include_keywords", "exclude_keywords"), ("keyword_frequency", "exclude_keywords"),
    ("include_keywords", "keyword_frequency"),
    ("lowercase", "uppercase"),
    ("end_with", "postscript"),
    ("start_with", "repeat_request"), ("start_with", "language_marker"), ("repeat_request", "language_marker"),
    *(("language_marker", kind) for kind in ("include_keywords", "keyword_frequency", "end_with")),
    *(("json_output", kind) for kind in (
        *_STRUCTURE, "title", "start_with", "end_with", "quotation", "postscript", "no_commas",
        "repeat_request", "language_marker", "highlights", "placeholders", "max_sentences", "min_sentences")),
)


# Answer-length floors in tokens. A word is about 1.3 tokens in the BPE vocabularies of small
# chat models (SmolLM2's: 1.33 on kaizen's own training answers); a sentence, paragraph or
# section takes at least a short sentence; a bullet a few words.
TOKENS_PER_WORD = 1.3
_MIN_TOKENS: dict[str, Callable[[Params], int]] = {
    "min_words": lambda p: math.ceil(TOKENS_PER_WORD * p["n"]),
    "min_sentences": lambda p: 8 * p["n"],
    "paragraphs": lambda p: 15 * p["n"],
    "numbered_sections": lambda p: 15 * p["n"],
    "bullet_points": lambda p: 6 * p["n"],
    "two_responses": lambda p: 20,
    "keyword_frequency": lambda p: 4 * p["n"],
    "repeat_request": lambda p: math.ceil(TOKENS_PER_WORD * len(p["request"].split())),
}


def _with_tables(kind: ConstraintKind) -> ConstraintKind:
    """`kind` with its conflicts and length floor from the tables above."""
    others = {b for a, b in _CONFLICTS if a == kind.name} | {a for a, b in _CONFLICTS if b == kind.name}
    return ConstraintKind(kind.name, kind.describe, kind.check, kind.sample, kind.param_names,
                          frozenset(others), kind.needs_task, _MIN_TOKENS.get(kind.name, kind.min_tokens))


KINDS: dict[str, ConstraintKind] = {kind.name: _with_tables(kind) for kind in _DEFINITIONS}
