"""generate_prompts draws the next cycle's constraint kinds by learnability: kinds whose earlier
training samples disagreed (verified pairs possible) come up more often than kinds always or
never satisfied. Real stage, tiny model, real lineage DB."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from daemon.db.engine import transaction
from daemon.db.lineage import INITIAL_CHECKPOINT_ID
from daemon.db.models import Iteration, IterationStatus, Prompt
from daemon.stage_runs import StageContext
from tests.factories import lineage_with_responses
from workers.stages.generate_prompts import generate_prompts

KINDS = ["lowercase", "uppercase", "no_commas"]
LOWER, UPPER, NO_COMMAS = ({"kind": "lowercase"},), ({"kind": "uppercase"},), ({"kind": "no_commas"},)
# lowercase: half the samples pass; uppercase: none does; no_commas: every one does.
HISTORY = [
    (f"Why is the sky blue, version {i}?", ["all lower here", "Not Lower", "still lower", "Capital A"], list(LOWER))
    for i in range(5)
] + [(f"Tell me about cats {i}.", ["nope", "no way", "Never", "not upper"], list(UPPER)) for i in range(5)] + [
    (f"How do birds fly {i}?", ["fine", "also fine", "ok then", "sure"], list(NO_COMMAS)) for i in range(5)
]


def test_kinds_whose_samples_disagreed_are_drawn_most(tmp_path, tiny_model_dir):
    overrides = {"prompts": {"per_cycle": 60, "max_rounds": 1, "constraint_kinds": KINDS, "top_up_from": "tasks"}}
    ctx, _ = lineage_with_responses(tmp_path / "data", tiny_model_dir, HISTORY, **overrides)
    with transaction(ctx.sessions) as session:
        session.get(Iteration, ctx.iteration_id).status = IterationStatus.completed
        following = Iteration(parent_checkpoint_id=INITIAL_CHECKPOINT_ID, status=IterationStatus.running, config_snapshot={})
        session.add(following)
        session.flush()
        next_ctx = StageContext(settings=ctx.settings, sessions=ctx.sessions, iteration_id=following.id)

    output = generate_prompts(next_ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        drawn = Counter(c["kind"] for p in session.scalars(select(Prompt).where(Prompt.iteration_id == next_ctx.iteration_id, Prompt.role == "train"))
                        for c in p.constraints)

    weights = output.result["kind_weights"]
    assert set(weights) == set(KINDS)
    assert weights["lowercase"] > weights["no_commas"] and weights["lowercase"] > weights["uppercase"]
    assert drawn["lowercase"] > drawn["no_commas"] and drawn["lowercase"] > drawn["uppercase"], drawn
    assert sum(drawn.values()) == output.result["constrained"]
