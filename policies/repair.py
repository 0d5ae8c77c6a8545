"""Verifier-guided repair: for many constraint kinds, the code that checks an answer can also
make a failing answer satisfy it with a minimal edit (lower-case it, wrap it in quotes, prepend
the request, append the closing phrase...).

Why: a kind the model never satisfies (lowercase, uppercase, quotation, repeat_request and
language_marker stay at 0 for SmolLM2-135M) yields no verified pair, since none of its N samples
passes. The repaired answer, preferred over the model's own failing answer, gives that kind a
pair whose two sides differ only where the constraint is (a minimal contrast, so DPO's gradient
lands on the tokens that matter and no length difference rides along).

`repair` edits only for kinds in `REPAIRS`, applies the edits of every failing constraint in a
fixed order (content cuts, then additions at the end, then at the start, then wrappers, then
case), and returns the result only if `check_all` then passes every constraint: a repair is
always verified by the same checker the suites use. Kinds with no sound edit (min_words,
min_sentences, sections, paragraphs, two responses, placeholders) are not repaired.

Keyword kinds are repaired in both directions, so that neither teaches the other's opposite: a
forbidden word is dropped or replaced by a plain synonym, and missing required words are named in
a closing "Key words:" line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from policies import constraint_text as ct
from policies.constraints import Constraint, check_all

Params = dict[str, Any]

_COMMA = re.compile(r"\s*[,，、]\s*")
# A line without stars, of two words or more: its first word stays outside the highlight, so a
# highlighted line never opens with a star (which a bullet does: "* item").
_HIGHLIGHTABLE = re.compile(r"^(?P<lead>\s*[^\s*]+\s+)(?P<body>[^*\n]*[^\W_][^*\n]*?)(?P<trail>\s*)$")
POSTSCRIPT_TEXT = "I hope this is useful."
TITLE_WORDS = 5
KEY_WORDS_LEAD = "Key words:"
# What a forbidden word of the library's pool becomes; any other forbidden word is dropped.
# Fillers go, nouns and adjectives get a plain synonym so the sentence still reads.
_SYNONYMS = {"thing": "point", "things": "points", "stuff": "material", "many": "numerous", "great": "good",
             "lot": "large number"}
_LIST_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?:[*\-•+]|\d{1,2}[.)])[ \t]+(?P<body>\S.*)$")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+(?=[,.;:!?])")
_DOUBLE_SPACE = re.compile(r"(?<=\S)[ \t]{2,}")


def _first_sentences(text: str, keep: Callable[[list[str]], bool]) -> str:
    """The text up to the last sentence end at which the leading sentences are still accepted by
    `keep`, line breaks kept (a cut list stays a list)."""
    lines: list[str] = []
    kept: list[str] = []
    for line in text.split("\n"):
        pieces = ct.sentences(line)
        taken = [piece for index, piece in enumerate(pieces) if keep([*kept, *pieces[: index + 1]])]
        if len(taken) < len(pieces):
            if taken:
                lines.append(" ".join(piece.strip() for piece in taken))
            break
        kept.extend(pieces)
        lines.append(line)
    return "\n".join(lines).rstrip()


def _max_words(p: Params, text: str) -> str:
    cut = _first_sentences(text, lambda kept: len(ct.words(" ".join(kept))) <= p["n"])
    return cut or " ".join(text.split()[: p["n"]])


def _max_sentences(p: Params, text: str) -> str:
    return _first_sentences(text, lambda kept: len(kept) <= p["n"])


def _no_commas(p: Params, text: str) -> str:
    return _COMMA.sub(" ", text)


def _highlights(p: Params, text: str) -> str:
    """Wrap lines after their first word in *...* until `n` are highlighted (lines with stars are left alone)."""
    lines, done = text.split("\n"), 0
    for index, line in enumerate(lines):
        match = _HIGHLIGHTABLE.match(line)
        if done == p["n"] or match is None:
            continue
        lines[index] = f"{match['lead']}*{match['body']}*{match['trail']}"
        done += 1
    return "\n".join(lines)


def _title(p: Params, text: str) -> str:
    first = ct.sentences(text)
    head = ct.words(first[0] if first else text)[:TITLE_WORDS]
    return f"<<{' '.join(head).capitalize()}>>\n\n{text.lstrip()}"


def _forbidden_word(word: str) -> re.Pattern[str]:
    """`word` (or phrase) whole, case-blind, with a comma that followed it ("Basically, ...")."""
    body = r"\W+".join(re.escape(piece) for piece in ct.words(word))
    return re.compile(rf"(?<![^\W_])(?<!['’]){body}(?![^\W_])(?!['’][^\W_])(?P<comma>,)?", re.IGNORECASE)


# Marks where a capitalised word was dropped, so the word after it takes the capital.
_DROPPED_CAPITAL = "\x00"


def _replacement(match: re.Match[str], word: str) -> str:
    capital = match.group(0)[0].isupper()
    synonym = _SYNONYMS.get(word.lower())
    if synonym is None:
        return _DROPPED_CAPITAL if capital else ""
    return (synonym[0].upper() + synonym[1:] if capital else synonym) + (match.group("comma") or "")


def _exclude_keywords(p: Params, text: str) -> str:
    for word in p["keywords"]:
        text = _forbidden_word(word).sub(lambda match, word=word: _replacement(match, word), text)
    text = _DOUBLE_SPACE.sub(" ", _SPACE_BEFORE_PUNCTUATION.sub("", text))
    text = re.sub(_DROPPED_CAPITAL + r"\s*(\w)", lambda m: m.group(1).upper(), text)
    return text.replace(_DROPPED_CAPITAL, "")


def _key_words_line(text: str, missing: list[str]) -> str:
    return f"{text.rstrip()}\n\n{KEY_WORDS_LEAD} {', '.join(missing)}."


def _include_keywords(p: Params, text: str) -> str:
    found = ct.words(text)
    return _key_words_line(text, [k for k in p["keywords"] if ct.count_phrase(found, k) == 0])


def _keyword_frequency(p: Params, text: str) -> str:
    missing = p["n"] - ct.count_phrase(ct.words(text), p["keyword"])
    return _key_words_line(text, [p["keyword"]] * missing)


def _bullet_points(p: Params, text: str) -> str:
    """The answer's own list items (bullets of any mark, or numbered) as exactly `n` "* " bullets:
    the first `n` are kept, later items are dropped. Unchanged when it lists fewer than `n`."""
    lines = text.split("\n")
    items = [index for index, line in enumerate(lines) if _LIST_ITEM.match(line)]
    if len(items) < p["n"]:
        return text
    kept = set(items[: p["n"]])
    out = []
    for index, line in enumerate(lines):
        if index in kept:
            match = _LIST_ITEM.match(line)
            assert match is not None  # kept lines are list items
            out.append(f"{match['indent']}* {match['body']}")
        elif index not in items:
            out.append(line)
    return "\n".join(out).rstrip()


_REPAIRS_IN_ORDER: tuple[tuple[str, Callable[[Params, str], str]], ...] = (
    ("exclude_keywords", _exclude_keywords),
    ("bullet_points", _bullet_points),
    ("max_words", _max_words),
    ("max_sentences", _max_sentences),
    ("no_commas", _no_commas),
    ("highlights", _highlights),
    ("include_keywords", _include_keywords),
    ("keyword_frequency", _keyword_frequency),
    ("postscript", lambda p, t: f"{t.rstrip()}\n\n{p['marker']} {POSTSCRIPT_TEXT}"),
    ("end_with", lambda p, t: f"{t.rstrip()} {p['phrase']}"),
    ("title", _title),
    ("start_with", lambda p, t: f"{p['phrase']} {t.lstrip()}"),
    ("language_marker", lambda p, t: f"Language: {p['language']}\n{t.lstrip()}"),
    ("repeat_request", lambda p, t: f"{p['request']}\n\n{t.lstrip()}"),
    ("json_output", lambda p, t: json.dumps({"answer": t.strip()}, ensure_ascii=False)),
    ("quotation", lambda p, t: f"\"{t.strip()}\""),
    ("lowercase", lambda p, t: t.lower()),
    ("uppercase", lambda p, t: t.upper()),
)
REPAIRS: dict[str, Callable[[Params, str], str]] = dict(_REPAIRS_IN_ORDER)
"""The kinds a failing answer can be repaired for, with their edit."""
REPAIRABLE_KINDS: frozenset[str] = frozenset(REPAIRS)
_ORDER = {kind: rank for rank, (kind, _) in enumerate(_REPAIRS_IN_ORDER)}


def repair(constraints: Sequence[Constraint], text: str) -> str | None:
    """`text` edited to satisfy every constraint, or None: when it already does, when a failing
    constraint has no repair, when the text is empty, or when the edited text still fails a check."""
    if not text.strip() or not constraints:
        return None
    failing = [c for c, ok in zip(constraints, check_all(constraints, text), strict=True) if not ok]
    if not failing or any(c.kind not in REPAIRS for c in failing):
        return None
    fixed = text
    for constraint in sorted(failing, key=lambda c: _ORDER[c.kind]):
        fixed = REPAIRS[constraint.kind](constraint.as_params(), fixed)
    return fixed if all(check_all(constraints, fixed)) else None
