"""The judge protocol: score one answer, compare two, label attributes, always in batches.

In the spirit of TRL's judges (``BasePairwiseJudge.judge(prompts, completions)``), but
batch-first over (prompt, answer...) tuples and returning records that say what was seen:

* :meth:`Judge.score` -> one :class:`Score` per (prompt, answer);
* :meth:`Judge.compare` -> one :class:`Comparison` per (prompt, answer_a, answer_b), whose
  ``preference`` is a position-debiased P(a better than b);
* :meth:`Judge.label` -> one :class:`Labels` per (prompt, answer) for the given attributes.

A backend implements what it can; the others raise :class:`JudgeCapabilityError` naming the
backend and the operation. A prompt is a plain string or a :class:`JudgePrompt` that also
carries verifiable constraints (``policies.constraints`` JSON), which code-checking judges read.

Backends load the model side inside their methods: the registry imports every backend module,
and a process that only uses a judge without a model (verifier, openai) need not load torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from daemon.config import Settings
    from workers.runtime import ModelRuntime

OVER_CONTEXT = "judge prompt over the model's context length"
"""The parse error of a score a model judge could not give because its prompt did not fit."""

Role = Literal["train", "gate", "label"]
ROLES: tuple[Role, ...] = ("train", "gate", "label")
Verdict = Literal["a", "b", "tie"]


@dataclass(frozen=True)
class JudgePrompt:
    """A prompt plus the constraints an answer to it must satisfy (JSON form, may be empty)."""

    text: str
    constraints: tuple[Mapping[str, Any], ...] = ()


PromptLike = str | JudgePrompt


def prompt_text(prompt: PromptLike) -> str:
    return prompt.text if isinstance(prompt, JudgePrompt) else prompt


def prompt_constraints(prompt: PromptLike) -> tuple[Mapping[str, Any], ...]:
    return prompt.constraints if isinstance(prompt, JudgePrompt) else ()


@dataclass(frozen=True)
class Score:
    """A judge's score of one answer. ``value`` is None exactly when ``parse_error`` says why.

    ``samples`` holds the per-sample scores when ``value`` summarises several judge samples
    (text mode's K samples): the lineage keeps one judgment row per sample. ``details`` holds
    backend numbers its trust metrics need (e.g. the score distribution of a logprob judge).
    """

    value: float | None
    raw: str
    parse_error: str | None
    judge: str
    samples: tuple[Score, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """A judge's comparison of answers a and b to one prompt.

    ``preference``: debiased P(a better than b) in [0, 1], None when the judge could not tell
    (unreadable, or nothing to check). ``verdict``: "a", "b", "tie" (within the margin) or None.
    ``raw``: the per-order numbers and whatever else the backend saw, JSON-safe.
    """

    preference: float | None
    raw: dict[str, Any]
    verdict: Verdict | None
    judge: str


@dataclass(frozen=True)
class Labels:
    """Attribute values of one answer; an attribute the judge did not label is in ``failures``."""

    values: Mapping[str, int]
    failures: Mapping[str, str]
    raw: tuple[str, ...]
    judge: str

    @property
    def complete(self) -> bool:
        return not self.failures


class JudgeCapabilityError(RuntimeError):
    """The configured judge cannot do what a stage asked of it (e.g. label attributes)."""


class JudgeUnavailable(RuntimeError):
    """The judge could not be reached or loaded; the message says what to fix. Nothing was written."""


ModelLoader = Callable[[str], "ModelRuntime"]


@dataclass(frozen=True)
class JudgeContext:
    """What a judge is built from.

    ``policy_path``: the current policy (the "self" of a self-judge). ``initial_path``: the
    lineage's first model. ``parent_path``: the policy's parent checkpoint (what it was trained
    from; None for the first model). ``load_model`` loads (and caches) a checkpoint path as a
    ``ModelRuntime``; stages pass their own, tests may pass any.
    """

    settings: Settings
    role: Role
    policy_path: str
    load_model: ModelLoader
    initial_path: str | None = None
    parent_path: str | None = None
    seed: int = 0

    @property
    def margin(self) -> float:
        return self.settings.gate.verdict_margin


class Judge:
    """Base class of every backend. ``name`` is set by ``register_judge``."""

    name: ClassVar[str] = "judge"

    def __init__(self, context: JudgeContext) -> None:
        self.context = context

    @property
    def label_name(self) -> str:
        """What judgment rows record as the judge (e.g. "self:logprob")."""
        return self.name

    def score(self, items: Sequence[tuple[PromptLike, str]]) -> list[Score]:
        raise JudgeCapabilityError(f"judge {self.label_name!r} cannot score single answers; choose another judge.backend")

    def compare(self, items: Sequence[tuple[PromptLike, str, str]]) -> list[Comparison]:
        raise JudgeCapabilityError(f"judge {self.label_name!r} cannot compare answers; choose another gate.judge")

    def label(self, items: Sequence[tuple[PromptLike, str]], attributes: Sequence[str]) -> list[Labels]:
        raise JudgeCapabilityError(f"judge {self.label_name!r} cannot label attributes; choose another judge.label_backend")

    def score_metrics(self, scores: Sequence[Score]) -> dict[str, Any]:
        """Trust metrics of a batch of scores (policies.judge_metrics names); backends add their own."""
        from policies import judge_metrics

        values = [s.value for s in scores]
        return {"parse_failure_rate": judge_metrics.parse_failure_rate(values)}


def swap_numbers(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-order record of a comparison read in both orders (``policies.debias`` numbers and
    ``order_verdicts``): the comparison's own raw, or, for a composite, the first level that has
    one. Empty when no judge read it in both orders (e.g. the constraint checks decided)."""
    if "order_verdicts" in raw:
        return raw
    for level in raw.get("levels", ()):
        found = swap_numbers(level.get("raw") or {})
        if found:
            return found
    return {}


def order_verdicts(comparison: Comparison) -> tuple[str | None, str | None]:
    """The verdict letters ("A", "B", "tie") of the two orders: a shown first, then b shown first."""
    letters = swap_numbers(comparison.raw).get("order_verdicts") or (None, None)
    return letters[0], letters[1]
