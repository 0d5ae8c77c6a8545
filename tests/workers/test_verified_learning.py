"""Two cycles of `verified` pairs on the tiny model raise the satisfaction rate of a simple
constraint on held-out prompts.

The 2-layer random model writes byte soup, but whether that soup contains a capital letter is
something DPO can move: the `lowercase` checks separate its samples (about 20% pass at
temperature 1 with 24 new tokens), so verified pairs exist (several per prompt), and their label
is correct by construction. A random model moves slowly (its attention and MLP outputs are small
next to the residual stream), hence the high learning rate, low beta, the NLL term and the replay.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.cycle import run_cycle
from daemon.db.models import Checkpoint, Iteration, Pair, StageRun
from daemon.dispatch import EagerDispatcher
from policies import constraints, verifiable
from policies.self_instruct import load_seed_prompts
from tests.factories import small_cycle_settings
from workers.runtime import ModelRuntime

pytestmark = pytest.mark.slow

KIND = "lowercase"


def satisfaction(model_path: str, tasks: list[str]) -> float:
    """Share of 8 samples per held-out task (temperature 1, fixed seed) that satisfy the constraint."""
    runtime = ModelRuntime.load(model_path, device="cpu")
    rng = random.Random(7)
    items = [verifiable.attach_constraints(task, rng, 1, [KIND]) for task in tasks]
    prompts = [runtime.render_chat([{"role": "user", "content": item.prompt}]) for item in items]
    outputs = runtime.generate(prompts, num_samples=8, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=11, batch_size=64)
    flags = [all(constraints.check_all(item.constraints, o.text)) for item, samples in zip(items, outputs, strict=True) for o in samples]
    return sum(flags) / len(flags)


def test_two_cycles_of_verified_pairs_raise_lowercase_satisfaction(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        generation={"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "batch_size": 64},
        prompts={"per_cycle": 24, "max_rounds": 1, "constraint_kinds": [KIND], "top_up_from": "tasks"},
        respond={"num_samples": 8},
        pairs={"strategy": "verified", "chosen_must_finish": False, "max_per_prompt": 4},  # the random model never ends an answer
        judge={"backend": "verifier"},
        training={"max_steps": -1, "epochs": 4, "learning_rate": 3e-2, "beta": 0.05, "rpo_alpha": 1.0,
                  "lora_r": 16, "lora_alpha": 128, "batch_size": 4, "replay_iterations": 1},
    )
    sessions = initialise(settings)
    for _ in range(2):
        run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        last = session.scalars(select(Iteration).order_by(Iteration.id.desc())).first()
        candidate = session.get(Checkpoint, last.candidate_checkpoint_id)
        kinds = set(session.scalars(select(Pair.kind)))
        dpo = session.scalars(select(StageRun).where(StageRun.iteration_id == last.id, StageRun.stage == "dpo_update")).one()
    assert kinds == {"verified"}
    assert dpo.result["replayed_pairs"] > 0  # the second candidate also trained on the first cycle's pairs
    # Held-out: seed prompts, never used for training in this run (training tasks came from the task pool).
    heldout = load_seed_prompts()[:16]
    before = satisfaction(str(tiny_model_dir), heldout)
    after = satisfaction(candidate.path, heldout)
    # Measured: 0.172 before, 0.211 after (22 -> 27 of 128 samples); the direction is the claim.
    assert after > before, (before, after)
