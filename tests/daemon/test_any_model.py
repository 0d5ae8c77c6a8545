"""Any causal LM: tiny random Llama, GPT-2, Qwen2 (ChatML) and GPT-NeoX models, with and without a
chat template, a 256-token context, no pad token: `kaizen init`, one `kaizen cycle` and
`kaizen serve` with every steering method work on each, and the loop trains on the prompts it sampled."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import load_settings
from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import Checkpoint, StageRun
from daemon.logs import configure_logging
from policies import rubric, steerlm
from policies.self_instruct import load_seed_prompts
from tests.factories import small_cycle_config
from workers.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

# (name, build arguments): between them every architecture, with and without a template, 256 positions, no pad.
MODELS = {
    "llama-chat": {"arch": "llama", "chat_template": "tiny", "context_length": 2048},
    "gpt2-base-256-nopad": {"arch": "gpt2", "chat_template": None, "context_length": 256, "pad_token": False},
    "qwen2-chatml": {"arch": "qwen2", "chat_template": "chatml", "context_length": 1024},
    "gptneox-base-512": {"arch": "gpt_neox", "chat_template": None, "context_length": 512},
}


def _corpus() -> list[str]:
    # Trained into the tiny tokenizer so kaizen's own prompt texts take realistic numbers of tokens.
    texts = [resources.files("policies").joinpath("data/urial/v1.yaml").read_text()]
    texts += [rubric.render_judge_prompt("q", "a"), rubric.render_pairwise_prompt("q", "a", "b"), steerlm.render_attribute_rubric_prompt("q", "a")]
    return load_seed_prompts() + [line for text in texts for line in text.splitlines() if line.strip()]


def invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args)
    configure_logging()
    return result


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, build_tiny_model(out, hidden_size=32, vocab_size=2048, extra_corpus=_corpus(), **MODELS[request.param])


@pytest.fixture(scope="module")
def cycled(model: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """init + one cycle on the model, recording the exact prompts respond sampled from."""
    name, path = model
    root = tmp_path_factory.mktemp(f"{name}-run")
    config_data = small_cycle_config(
        root / "data", path,
        training={"max_length": 2048},  # kept inside the model's context by the trainer
        serve={"max_new_tokens": 4096, "genarm": {"reward_models": {"self": {"path": str(path)}}}},
    )
    config = root / "kaizen.yaml"
    config.write_text(yaml.safe_dump(config_data))
    init = invoke(["init", "--config", str(config)])
    assert init.exit_code == 0, init.output

    import workers.stages.respond as respond_module

    sampled: list[str] = []
    original = respond_module.sample

    def recording_sample(ctx, runtime, texts, **kwargs):  # type: ignore[no-untyped-def]
        sampled.extend(texts)
        return original(ctx, runtime, texts, **kwargs)

    respond_module.sample = recording_sample
    try:
        cycle = invoke(["cycle", "--config", str(config)])
    finally:
        respond_module.sample = original
    assert cycle.exit_code == 0, cycle.output
    return {"config": config, "settings": load_settings(config), "sampled": sampled, "model": path, "name": name}


def _stage_results(settings) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    with make_session_factory(make_engine(settings.resolved_database_url))() as session:
        return {row.stage: row.result for row in session.scalars(select(StageRun))}


def test_init_records_the_profile_and_the_cycle_completes(cycled: dict) -> None:
    settings, spec = cycled["settings"], MODELS[cycled["name"]]
    with make_session_factory(make_engine(settings.resolved_database_url))() as session:
        profiles = {c.id: c.profile for c in session.scalars(select(Checkpoint))}
    initial = profiles["ckpt-0000"]
    assert initial["context_length"] == spec["context_length"]
    assert initial["prompt_format"] == ("chat_template" if spec["chat_template"] else "urial")
    assert initial["pad_token_id"] is None if spec.get("pad_token") is False else initial["pad_token_id"] is not None
    # Candidates are profiled too (a trainer may have given a pad-less tokenizer its eos as pad).
    same = ("context_length", "prompt_format", "eos_token_ids", "bos_token_id", "stop_strings", "has_chat_template")
    assert all({k: p[k] for k in same} == {k: initial[k] for k in same} for p in profiles.values())
    results = _stage_results(settings)
    assert {"generate_prompts", "respond", "judge", "evaluate_gate"} <= results.keys()
    # Nothing was sent past the context: what did not fit was skipped and counted.
    assert all(isinstance(results[stage].get("skipped_over_context"), int) for stage in ("respond", "judge"))


def test_the_dpo_dataset_prompts_are_the_prompts_respond_sampled(cycled: dict) -> None:
    results = _stage_results(cycled["settings"])
    dataset = results["dpo_update"].get("dataset")
    if dataset is None:
        pytest.skip(f"no pairs on {cycled['name']}: {results['dpo_update']}")
    rows = [json.loads(line) for line in Path(dataset.removeprefix("file://")).read_text().splitlines()]
    assert rows
    for row in rows:
        assert row["prompt"] in cycled["sampled"]  # byte for byte
    if MODELS[cycled["name"]]["chat_template"] is None:
        assert all(row["prompt"].endswith("# Answer:\n") for row in rows)  # a base model is prompted with URIAL


@pytest.mark.parametrize("steering", ["none", "urial", "steerlm", "genarm"])
def test_serve_answers_with_every_steering_method(cycled: dict, steering: str) -> None:
    from daemon.serving import build_app

    body = {"model": "kaizen", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8, "seed": 1}
    body["steering"] = {"method": steering, **({"reward_models": {"self": 1.0}} if steering == "genarm" else {})}
    with TestClient(build_app(cycled["settings"]), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    assert response.json()["usage"]["completion_tokens"] <= 8


def test_an_over_context_request_is_a_400_naming_the_limit(cycled: dict) -> None:
    from daemon.serving import build_app

    limit = MODELS[cycled["name"]]["context_length"]
    long_text = "Describe the water cycle. " * limit
    body = {"model": "kaizen", "messages": [{"role": "user", "content": long_text}], "max_tokens": 8}
    with TestClient(build_app(cycled["settings"]), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/chat/completions", json=body)
        completion = client.post("/v1/completions", json={"model": "kaizen", "prompt": "Hi", "max_tokens": limit})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert f"maximum context length is {limit} tokens" in error["message"]
    assert completion.status_code == 400 and completion.json()["error"]["code"] == "context_length_exceeded"
