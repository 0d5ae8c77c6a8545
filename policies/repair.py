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
keywords, bullet points, sections, paragraphs, two responses, placeholders) are not repaired.
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
    sentences = ct.sentences(text)
    head = ct.words(sentences[0] if sentences else text)[:TITLE_WORDS]
    return f"<<{' '.join(head).capitalize()}>>\n\n{text.lstrip()}"


_REPAIRS_IN_ORDER: tuple[tuple[str, Callable[[Params, str], str]], ...] = (
    ("max_words", _max_words),
    ("max_sentences", _max_sentences),
    ("no_commas", _no_commas),
    ("highlights", _highlights),
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
