"""Verifiable constraints: instructions whose satisfaction code can check (AutoIF, Tulu 3
RLVR for instruction following).

A `Constraint` is a kind plus parameters, e.g. `Constraint.of("max_words", n=40)`;
`describe` gives the sentence appended to a prompt ("Answer in at most 40 words."), `check`
says whether an answer satisfies it. The kinds, their checkers and parameter samplers live
in `policies.constraint_kinds` (see its docstring for how answers are read); `KINDS` lists
them. An empty (or whitespace-only) answer satisfies no constraint.

The language marker (`language_marker`) is checkable without a language model: the first
non-empty line must be "Language: <name>" and the rest must contain more of that
language's frequent function words than of any other listed language (at least 2).

`repeat_request` takes its parameter from the task (`request`), so `sample_constraints`
draws it only when given the task.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policies import constraint_text as ct
from policies.constraint_kinds import KINDS, ConstraintKind

__all__ = [
    "KINDS",
    "Constraint",
    "ConstraintKind",
    "check",
    "check_all",
    "describe",
    "render_prompt",
    "sample_constraints",
]


def _frozen(value: Any) -> Any:
    # Lists (from JSON) become tuples so a Constraint stays hashable.
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thawed(item) for item in value]
    return value


@dataclass(frozen=True)
class Constraint:
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, **params: Any) -> Constraint:
        """A validated constraint: the kind must exist and get exactly its parameters."""
        spec = kind_of(kind)
        expected, given = set(spec.param_names), set(params)
        if expected != given:
            raise ValueError(
                f"constraint {kind!r} takes parameters {sorted(expected)}, got {sorted(given)}"
            )
        return cls(kind, tuple(sorted((name, _frozen(value)) for name, value in params.items())))

    def param(self, name: str) -> Any:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(f"constraint {self.kind!r} has no parameter {name!r}")

    def as_params(self) -> dict[str, Any]:
        return dict(self.params)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{name: _thawed(value) for name, value in self.params}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Constraint:
        if not isinstance(data, Mapping) or "kind" not in data:
            raise ValueError(f"a constraint is an object with a \"kind\" field, got {data!r}")
        params = {key: value for key, value in data.items() if key != "kind"}
        return cls.of(str(data["kind"]), **params)


def kind_of(name: str) -> ConstraintKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown constraint kind {name!r}; allowed: {', '.join(sorted(KINDS))}") from None


def check(constraint: Constraint, text: str) -> bool:
    """Whether `text` satisfies `constraint`. An empty answer satisfies nothing."""
    if not text or not text.strip():
        return False
    return bool(kind_of(constraint.kind).check(constraint.as_params(), text))


def check_all(constraints: Iterable[Constraint], text: str) -> list[bool]:
    return [check(constraint, text) for constraint in constraints]


def describe(constraint: Constraint) -> str:
    return kind_of(constraint.kind).describe(constraint.as_params())


def min_answer_tokens(constraints: Iterable[Constraint]) -> int:
    """The fewest answer tokens that could satisfy all of `constraints` (the sum of each kind's
    rough floor, ``ConstraintKind.min_tokens``)."""
    return sum(kind_of(c.kind).min_tokens(c.as_params()) for c in constraints)


ECHO_SPAN = 4


def echoes_instructions(constraints: Iterable[Constraint], text: str, span: int = ECHO_SPAN) -> bool:
    """Whether `text` copies an instruction sentence of `constraints` instead of following it:
    `span` consecutive words of one (lower-cased words, as the checkers read them), not counting
    runs that lie inside a parameter (the phrase an answer must end with is meant to be written).

    Why: SmolLM2-135M trained on repairs that prepend the request learned to copy the constraint
    sentences too ("do not use the word basically"); such an answer can still pass some checks,
    so pair building needs this to keep it from being chosen."""
    seen = _word_runs(text, span)
    for constraint in constraints:
        values = [v for value in constraint.as_params().values() for v in (value if isinstance(value, (list, tuple)) else [value])]
        inside_params = set().union(*(_word_runs(str(value), span) for value in values))
        if (_word_runs(describe(constraint), span) - inside_params) & seen:
            return True
    return False


def _word_runs(text: str, span: int) -> set[tuple[str, ...]]:
    """Every `span` consecutive words of `text`."""
    found = ct.words(text)
    return {tuple(found[i : i + span]) for i in range(len(found) - span + 1)}


def render_prompt(task: str, constraints: Sequence[Constraint]) -> str:
    """The task followed by one instruction sentence per constraint."""
    return " ".join([task.strip(), *(describe(constraint) for constraint in constraints)])


def conflicts(a: str, b: str) -> bool:
    return a == b or b in kind_of(a).conflicts_with


def sample_constraints(
    rng: random.Random,
    k: int,
    kinds: Sequence[str] | None = None,
    task: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[Constraint]:
    """`k` constraints of distinct, mutually compatible kinds, with sampled parameters.

    `kinds` restricts the choice (default: every kind); `weights` (positive, per kind; default
    uniform) makes the draw a weighted one without replacement. Kinds that need the task
    (`repeat_request`) take part only when `task` is given. Deterministic for a given `rng`
    state. Raises ValueError when `k` compatible kinds cannot be found.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = sorted(set(kinds) if kinds is not None else set(KINDS))
    for name in pool:
        kind_of(name)
    pool = [name for name in pool if task is not None or not KINDS[name].needs_task]
    if weights is None:
        rng.shuffle(pool)
    else:
        # Efraimidis-Spirakis: ordering by u^(1/w) is a weighted sample without replacement.
        keys = {name: rng.random() ** (1.0 / weights[name]) for name in pool}
        pool.sort(key=keys.__getitem__, reverse=True)
    chosen: list[str] = []
    for name in pool:
        if len(chosen) == k:
            break
        if not any(conflicts(name, other) for other in chosen):
            chosen.append(name)
    if len(chosen) < k:
        raise ValueError(f"cannot choose {k} compatible constraint kinds from {sorted(pool)}")
    return [_sampled(name, rng, task) for name in chosen]


def _sampled(name: str, rng: random.Random, task: str | None) -> Constraint:
    params = KINDS[name].sample(rng)
    if KINDS[name].needs_task:
        params = {**params, "request": (task or "").strip()}
    return Constraint.of(name, **params)
