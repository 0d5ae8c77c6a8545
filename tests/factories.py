from __future__ import annotations

from pathlib import Path

from daemon.config import Settings, load_settings


def small_cycle_config(data_dir: Path, model_path: Path, **overrides) -> dict:
    """A cycle small enough to run in seconds on 2 CPU cores, as a plain (YAML-ready) dict."""
    config = {
        "data_dir": str(data_dir),
        "model": {"path": str(model_path)},
        "worker": {"mode": "eager"},
        "generation": {"max_new_tokens": 12, "batch_size": 32},
        "prompts": {"per_cycle": 3, "max_rounds": 1},
        "respond": {"num_samples": 2},
        "judge": {"num_samples": 1, "max_new_tokens": 12},
        "training": {"max_steps": 2, "batch_size": 2, "max_length": 128},
        "gate": {"heldout_prompts": 4, "min_comparisons": 2},
        "eval": {"max_items": 8, "max_new_tokens": 16},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def small_cycle_settings(data_dir: Path, model_path: Path, **overrides) -> Settings:
    return load_settings(None, **small_cycle_config(data_dir, model_path, **overrides))


def lineage_with_responses(data_dir: Path, model_dir: Path, rows, **overrides):
    """A migrated lineage DB whose champion is ``model_dir``, with one running iteration holding
    ``rows``: (prompt, answers) or (prompt, answers, constraints JSON) each, as train prompts with
    policy responses. Returns the stage context and the response id of each answer text."""
    from daemon.bootstrap import initialise
    from daemon.db.engine import transaction
    from daemon.db.lineage import INITIAL_CHECKPOINT_ID
    from daemon.db.models import Iteration, IterationStatus, Prompt, Response
    from daemon.stage_runs import StageContext

    settings = small_cycle_settings(data_dir, model_dir, **overrides)
    sessions = initialise(settings)
    response_ids: dict[str, int] = {}
    with transaction(sessions) as session:
        iteration = Iteration(parent_checkpoint_id=INITIAL_CHECKPOINT_ID, status=IterationStatus.running, config_snapshot={})
        session.add(iteration)
        session.flush()
        for prompt_text, answers, *constraints in rows:
            prompt = Prompt(iteration_id=iteration.id, text=prompt_text, role="train", source="seed", constraints=constraints[0] if constraints else None)
            session.add(prompt)
            session.flush()
            for index, answer in enumerate(answers):
                response = Response(
                    iteration_id=iteration.id, prompt_id=prompt.id, kind="policy", sample_index=index, text=answer,
                    num_tokens=len(answer.split()),
                )
                session.add(response)
                session.flush()
                response_ids[answer] = response.id
        iteration_id = iteration.id
    return StageContext(settings=settings, sessions=sessions, iteration_id=iteration_id), response_ids


def run_respond(data_dir: Path, model_dir: Path, prompts: list[str], num_samples: int, respond_settings: dict | None = None, **overrides):  # type: ignore[no-untyped-def]
    """The respond stage (policy samples and RLCD answers) on a fresh lineage of ``prompts``:
    its Response rows, in id order, and its result. ``respond_settings`` add to respond.num_samples."""
    from sqlalchemy import select

    from daemon.db.engine import transaction
    from daemon.db.models import Response
    from workers.stages.respond import respond

    ctx, _ = lineage_with_responses(
        data_dir, model_dir, [(p, []) for p in prompts], respond={"num_samples": num_samples, **(respond_settings or {})},
        pairs={"strategy": "self_reward+rlcd"}, **overrides,
    )
    output = respond(ctx)
    with transaction(ctx.sessions) as session:
        output.write(session)
    with ctx.sessions() as session:
        rows = list(session.scalars(select(Response).order_by(Response.id)))
        session.expunge_all()
    return rows, output.result


def stand_in_checkpoint(path: Path) -> str:
    """A small, complete checkpoint directory (one file and its manifest) for lineages whose
    models are never loaded: promote and rollback verify the target's files before trusting it."""
    from workers.checkpoints import write_checkpoint

    return str(write_checkpoint(path, lambda tmp: (tmp / "weights.safetensors").write_bytes(path.name.encode() * 64), {"stand_in": True}))


def give_checkpoints_stand_in_files(sessions, root: Path) -> None:  # type: ignore[no-untyped-def]
    """Point every checkpoint of a seeded lineage at a stand-in checkpoint under ``root``."""
    from sqlalchemy import select

    from daemon.db.engine import transaction
    from daemon.db.models import Checkpoint

    with transaction(sessions) as session:
        for checkpoint in session.scalars(select(Checkpoint)):
            checkpoint.path = stand_in_checkpoint(root / checkpoint.id)


def lora_candidate(base_dir: str | Path, out_dir: Path, *, seed: int, rank: int = 8, max_stacked_adapters: int = 1) -> Path:
    """A LoRA candidate of ``base_dir`` as the trainers commit one (merged weights, the adapter
    beside them, workers.lora_training.commit_merged) without training: the adapter's weights are
    random (``seed``), so each candidate answers differently from the base and from the others.
    ``max_stacked_adapters`` above 1: a candidate of a candidate also gets its lineage adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.lora_training import commit_merged

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config).eval()
    return commit_merged(
        out_dir, peft_model, AutoTokenizer.from_pretrained(str(base_dir)), {"kind": "test_lora", "parent": str(base_dir)},
        max_stacked_adapters=max_stacked_adapters,
    )
