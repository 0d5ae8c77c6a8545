"""Training-side verifiable prompts: a task plus constraints from the same library as the
held-out `instruct-checks` suite, but never its tasks.

Training tasks come from policies/data/verifiable_tasks.json (written for kaizen, disjoint
from the suite's stems: they open with "Tell me/How/Why/What", the suite's with
"Describe/Explain/Give/Write"), from the seed set, or from self-instruct; constraint
parameters are drawn from the caller's rng, seeded per iteration (see `training_rng`),
never from the suite's seed. `drop_suite_overlaps` removes any task that is, or nearly is,
a suite task, so a self-generated task that happens to match one cannot leak it into training.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from policies.constraints import Constraint, min_answer_tokens, render_prompt, sample_constraints
from policies.self_instruct import deduplicate, load_task_list
from policies.suites import heldout_suite_tasks

TRAINING_TASKS_RESOURCE = "data/verifiable_tasks.json"
# Stricter than self-instruct's near-duplicate threshold (0.7): training tasks must stay
# clearly apart from suite tasks.
SUITE_OVERLAP_LIMIT = 0.5


@dataclass(frozen=True)
class VerifiablePrompt:
    task: str
    constraints: tuple[Constraint, ...]
    prompt: str


def load_training_tasks() -> list[str]:
    return load_task_list(TRAINING_TASKS_RESOURCE)


def training_rng(seed: int, iteration: int) -> random.Random:
    """The rng for an iteration's constraints; its seed space is apart from the suite's."""
    return random.Random(f"kaizen/verifiable-train/{seed}/{iteration}")


def constraint_count(rng: random.Random, counts: int | Sequence[int]) -> int:
    """How many constraints a prompt gets: `counts` itself, or one of a list drawn uniformly
    (a fixed count draws nothing from `rng`, so its prompts are as before lists existed)."""
    return counts if isinstance(counts, int) else rng.choice(list(counts))


# A draw fits the answer budget when its floor leaves a quarter of the budget spare: the floor
# counts only what the checks demand, and an answer has a few words around that.
BUDGET_SHARE = 0.75
MAX_REDRAWS = 20


def attach_constraints(
    task: str, rng: random.Random, k: int, kinds: Sequence[str] | None = None, weights: Mapping[str, float] | None = None,
    answer_budget: int | None = None,
) -> VerifiablePrompt:
    """`task` with `k` compatible constraints (of `kinds`, default any; drawn by `weights`,
    default uniform); the prompt is the task plus their sentences.

    With `answer_budget` (the tokens an answer may take), a draw whose length floor
    (:func:`policies.constraints.min_answer_tokens`) exceeds ``BUDGET_SHARE`` of it is drawn
    again, up to ``MAX_REDRAWS`` times, then the draw with the lowest floor is kept: "at least
    120 words" in 128 tokens can only be failed or cut, which teaches nothing (measured on
    SmolLM2: 88% of such samples cut)."""
    task = as_sentence(task)
    constraints = tuple(sample_constraints(rng, k, kinds=kinds, task=task, weights=weights))
    if answer_budget is not None:
        limit = BUDGET_SHARE * answer_budget
        for _ in range(MAX_REDRAWS):
            if min_answer_tokens(constraints) <= limit:
                break
            again = tuple(sample_constraints(rng, k, kinds=kinds, task=task, weights=weights))
            constraints = min(constraints, again, key=min_answer_tokens)
    return VerifiablePrompt(task, constraints, render_prompt(task, constraints))


def as_sentence(task: str) -> str:
    """`task` stripped, with a full stop added when it ends without punctuation: a self-written
    task is often a bare title ("Morning Bible Study"), and the constraint sentence that follows
    must not read as part of it."""
    task = task.strip()
    return task if not task or task[-1] in ".?!:;\"')]" else task + "."


def task_of(prompt: str, constraints: Sequence[Constraint]) -> str:
    """The task a rendered prompt was made from: `prompt` without its constraint sentences
    (the inverse of `render_prompt`); `prompt` itself when it does not end with them."""
    suffix = render_prompt("", constraints).strip()
    if suffix and prompt.endswith(suffix):
        return prompt[: -len(suffix)].strip()
    return prompt.strip()


@lru_cache(maxsize=1)
def _suite_tasks() -> tuple[str, ...]:
    return tuple(heldout_suite_tasks())


def drop_suite_overlaps(tasks: Sequence[str], max_overlap: float = SUITE_OVERLAP_LIMIT) -> list[str]:
    """`tasks` without those equal to or overlapping (word 3-gram containment above
    `max_overlap`) an instruct-checks task. Order is kept; duplicates within `tasks` are
    kept too (that is self-instruct's deduplication, not this)."""
    suite = list(_suite_tasks())
    return [task for task in tasks if deduplicate([task], suite, max_overlap=max_overlap)]
