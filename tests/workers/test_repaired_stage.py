"""The `repaired` pair strategy in the stages: build_pairs stores each repair as a response of kind
"repaired" and pairs it over its source; dpo_update trains on and replays those pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.cycle import run_cycle
from daemon.db.engine import transaction
from daemon.db.models import Iteration, Pair, Response, StageRun
from daemon.dispatch import EagerDispatcher
from tests.factories import lineage_with_responses, small_cycle_settings
from workers.stages.build_pairs import build_pairs

LOWERCASE = [{"kind": "lowercase"}]



def stored_pairs(ctx):  # type: ignore[no-untyped-def]
    """build_pairs run and written: the stored (kind, chosen id, rejected id) pairs, and its output."""
    output = build_pairs(ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        return [(p.kind, p.chosen_response_id, p.rejected_response_id) for p in session.scalars(select(Pair).order_by(Pair.id))], output

def test_build_pairs_stores_repairs_for_prompts_the_checks_cannot_separate(tmp_path: Path, tiny_model_dir: Path):
    rows = [
        ("Why walk? Write in lowercase.", ["Walking Helps.", "walking helps a lot."], LOWERCASE),
        ("Why sleep? Write in lowercase.", ["Sleep Heals.", "Sleep Is Good For You.", "Rest."], LOWERCASE),
    ]
    ctx, ids = lineage_with_responses(
        tmp_path / "data", tiny_model_dir, rows, pairs={"strategy": "verified+repaired", "max_per_prompt": 2},
        judge={"backend": "verifier"}, generation={"max_new_tokens": 64},
    )
    output = build_pairs(ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        pairs = session.scalars(select(Pair).order_by(Pair.id)).all()
        shown = [(p.kind, session.get(Response, p.chosen_response_id), session.get(Response, p.rejected_response_id)) for p in pairs]

    assert output.result["verified_pairs"] == 1 and output.result["repaired_pairs"] == 2
    verified, *repaired = shown
    assert verified[0] == "verified" and (verified[1].id, verified[2].id) == (ids["walking helps a lot."], ids["Walking Helps."])
    # The all-failing prompt gets two repairs (max_per_prompt), of its first two answers, as new responses.
    assert [(kind, chosen.kind, chosen.text, rejected.id) for kind, chosen, rejected in repaired] == [
        ("repaired", "repaired", "sleep heals.", ids["Sleep Heals."]),
        ("repaired", "repaired", "sleep is good for you.", ids["Sleep Is Good For You."]),
    ]
    assert all(chosen.prompt_id == rejected.prompt_id and chosen.num_tokens > 0 for _, chosen, rejected in repaired)


@pytest.mark.slow
def test_repaired_pairs_train_the_candidate_and_are_replayed_next_cycle(tmp_path: Path, tiny_model_dir: Path):
    # The random tiny model's byte soup almost always holds a capital letter: lowercase repairs abound.
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        generation={"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0},
        prompts={"per_cycle": 4, "constraint_kinds": ["lowercase"], "top_up_from": "tasks"},
        respond={"num_samples": 3},
        pairs={"strategy": "repaired", "chosen_must_finish": False, "max_per_prompt": 2},
        judge={"backend": "verifier"},
        training={"replay_iterations": 1},
        eval={"suites": []},
    )
    sessions = initialise(settings)
    for _ in range(2):
        run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        first, second = session.scalars(select(Iteration).order_by(Iteration.id)).all()
        first_pairs = session.scalars(select(Pair.id).where(Pair.iteration_id == first.id, Pair.kind == "repaired")).all()
        dpo = session.scalars(select(StageRun).where(StageRun.iteration_id == second.id, StageRun.stage == "dpo_update")).one()
    assert first_pairs and first.candidate_checkpoint_id is not None
    assert set(first_pairs) <= set(dpo.result["replayed_pair_ids"])


def test_with_reject_echoes_an_answer_that_copies_the_instruction_is_rejected_never_chosen(tmp_path: Path, tiny_model_dir: Path):
    forbid = [{"kind": "exclude_keywords", "keywords": ["basically"]}]
    rows = [
        ("Why walk? Do not use the word \"basically\".", ["Do not use the word.", "Walking is basically free.", "Walking is free."], forbid),
        ("Why nap? Do not use the word \"basically\".", ["DO NOT use the word ok", "Naps basically help."], forbid),
    ]
    echoed = {"pairs": {"strategy": "verified+repaired", "reject_echoes": True}}
    ctx, ids = lineage_with_responses(tmp_path / "on", tiny_model_dir, rows, judge={"backend": "verifier"}, **echoed)
    output = build_pairs(ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        made = [(p.kind, p.chosen_response_id, p.rejected_response_id) for p in session.scalars(select(Pair).order_by(Pair.id))]
        repaired_texts = [session.get(Response, chosen).text for kind, chosen, _ in made if kind == "repaired"]

    assert output.result["echoing_answers"] == 2
    # The echo passes the check (it never says the word) yet is rejected, against the clean passing answer.
    assert made[0] == ("verified", ids["Walking is free."], ids["Do not use the word."])
    # The other prompt's echo is neither chosen nor repaired; its clean failing answer is repaired.
    assert [(kind, rejected) for kind, _, rejected in made[1:]] == [("repaired", ids["Naps basically help."])]
    assert repaired_texts == ["Naps help."]

    ctx, ids = lineage_with_responses(tmp_path / "off", tiny_model_dir, rows, judge={"backend": "verifier"}, pairs={"strategy": "verified+repaired"})
    output = build_pairs(ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        made = [(p.kind, p.chosen_response_id, p.rejected_response_id) for p in session.scalars(select(Pair).order_by(Pair.id))]
    # Without the option the echo passes for an answer: it is chosen over the clean failing one.
    assert output.result["echoing_answers"] == 0
    assert made == [
        ("verified", ids["Walking is free."], ids["Walking is basically free."]),
        ("verified", ids["DO NOT use the word ok"], ids["Naps basically help."]),
    ]


def test_with_reject_unfinished_a_cut_answer_is_rejected_though_its_checks_pass(tmp_path: Path, tiny_model_dir: Path):
    # lineage_with_responses counts an answer's words as its tokens: with max_new_tokens 4, the
    # five-word answer was cut. Every answer is lower-case, so only the cut one can be rejected.
    rows = [("Why walk? Write in lowercase.", ["walking helps a lot really", "walking helps."], LOWERCASE)]
    settings = {"judge": {"backend": "verifier"}, "generation": {"max_new_tokens": 4}}
    ctx, ids = lineage_with_responses(tmp_path / "on", tiny_model_dir, rows, pairs={"strategy": "verified", "reject_unfinished": True}, **settings)
    made, output = stored_pairs(ctx)
    assert made == [("verified", ids["walking helps."], ids["walking helps a lot really"])]
    assert output.result["unfinished_rejected"] == 1

    ctx, _ = lineage_with_responses(tmp_path / "off", tiny_model_dir, rows, pairs={"strategy": "verified"}, **settings)
    output = build_pairs(ctx)
    assert output.result["pairs"] == 0 and output.result["unfinished_rejected"] == 0


def test_finish_within_counts_an_answer_past_that_share_of_the_budget_as_unfinished(tmp_path: Path, tiny_model_dir: Path):
    # Words are tokens here (lineage_with_responses): with max_new_tokens 10 neither answer was
    # cut, but at finish_within 0.5 the six-word one ran past 5 tokens and counts as unfinished.
    rows = [("Why walk? Write in lowercase.", ["walking helps a lot, really. yes.", "walking helps."], LOWERCASE)]
    settings = {"judge": {"backend": "verifier"}, "generation": {"max_new_tokens": 10}}

    def pairs_made(name: str, **pair_settings: object) -> tuple[list[tuple[str, str, str]], dict]:
        ctx, ids = lineage_with_responses(tmp_path / name, tiny_model_dir, rows, pairs={"strategy": "verified", "reject_unfinished": True, **pair_settings}, **settings)
        made, output = stored_pairs(ctx)
        by_text = {v: k for k, v in ids.items()}
        return [(kind, by_text[chosen], by_text[rejected]) for kind, chosen, rejected in made], output.result

    made, result = pairs_made("within", finish_within=0.5)
    assert made == [("verified", "walking helps.", "walking helps a lot, really. yes.")]
    assert result["unfinished_rejected"] == 1
    made, result = pairs_made("whole")
    assert made == [] and result["unfinished_rejected"] == 0, "both answers pass and ended within the budget: no pair"


def test_with_reject_loops_a_looping_answer_is_rejected_though_its_checks_pass(tmp_path: Path, tiny_model_dir: Path):
    # Both answers are lower-case and ended; only the one repeating a line can be rejected.
    looping = "walking helps.\nwalk more.\nwalk more.\nwalk more."
    rows = [("Why walk? Write in lowercase.", [looping, "walking helps."], LOWERCASE)]
    settings = {"judge": {"backend": "verifier"}, "generation": {"max_new_tokens": 32}}
    ctx, ids = lineage_with_responses(tmp_path / "on", tiny_model_dir, rows, pairs={"strategy": "verified", "reject_loops": True}, **settings)
    made, output = stored_pairs(ctx)
    assert made == [("verified", ids["walking helps."], ids[looping])]
    assert output.result["looping_answers"] == 1

    ctx, _ = lineage_with_responses(tmp_path / "off", tiny_model_dir, rows, pairs={"strategy": "verified"}, **settings)
    output = build_pairs(ctx)
    assert output.result["pairs"] == 0 and output.result["looping_answers"] == 1, "counted either way, rejected only with the option"


def test_ended_pairs_reject_a_looping_answer_even_where_no_answer_passes(tmp_path: Path, tiny_model_dir: Path):
    # No answer is lower-case, so verified pairs are impossible; the ended pair still teaches to end.
    looping = "Walking helps.\nWalk more.\nWalk more.\nWalk more."
    rows = [("Why walk? Write in lowercase.", [looping, "Walking Helps."], LOWERCASE)]
    settings = {"judge": {"backend": "verifier"}, "generation": {"max_new_tokens": 32}}
    ctx, ids = lineage_with_responses(tmp_path / "data", tiny_model_dir, rows, pairs={"strategy": "verified+ended"}, **settings)
    made, output = stored_pairs(ctx)
    assert made == [("ended", ids["Walking Helps."], ids[looping])]
    assert output.result["ended_pairs"] == 1 and output.result["verified_pairs"] == 0
