"""The real server on a loopback port, called with the `openai` client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.db import lineage
from daemon.db.engine import transaction
from daemon.db.models import Checkpoint, CheckpointStatus
from tests.serving.harness import Server, openai_client
from workers.checkpoints import write_checkpoint

pytestmark = pytest.mark.slow


def _checkpoint_copy(src: Path, dest: Path, *, scale: float) -> Path:
    """A real, different checkpoint: the tiny model with its weights scaled."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    tokenizer = AutoTokenizer.from_pretrained(src)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_checkpoint(dest, write, {"kind": "test"})


def _register(sessions, checkpoint_id: str, path: Path) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        session.add(Checkpoint(id=checkpoint_id, parent_id="ckpt-0000", base_model="tiny", path=str(path), status=CheckpointStatus.candidate, metrics={}))


def _promote(sessions, checkpoint_id: str) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        lineage.promote(session, checkpoint_id, actor="test", reason="test")


def _chat(client: openai.OpenAI, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model="kaizen", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, seed=7, **kwargs
    )


def _wait_for_fingerprint(client: openai.OpenAI, expected: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = _chat(client).system_fingerprint
        if seen == expected:
            return seen
        time.sleep(0.1)
    return seen or ""


def test_plain_chat_completion_and_models(deployment) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    client = openai_client(server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["kaizen"]
    reply = _chat(client)
    assert reply.system_fingerprint == "ckpt-0000"
    assert reply.model_extra["kaizen"] == {"checkpoint_id": "ckpt-0000", "steering": {"method": "none"}}
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.completion_tokens >= 1
    # The same seed gives the same sample; the server is deterministic per request.
    assert _chat(client).choices[0].message.content == reply.choices[0].message.content


def test_streaming_joins_to_the_same_text_as_a_plain_request(deployment) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    client = openai_client(server)
    whole = _chat(client, temperature=0).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in _chat(client, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == whole
    text = client.completions.create(model="kaizen", prompt="Once upon a time", max_tokens=8, temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="kaizen", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert streamed == text


def test_each_steering_method_answers(deployment) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    client = openai_client(server)
    urial = _chat(client, extra_body={"steering": {"method": "urial"}})
    assert "# Query:" not in urial.choices[0].message.content
    assert urial.model_extra["kaizen"]["steering"] == {"method": "urial"}
    steer = _chat(client, extra_body={"steering": {"method": "steerlm", "attributes": {"humor": 3}}})
    assert steer.model_extra["kaizen"]["steering"]["attributes"]["humor"] == 3
    assert isinstance(steer.choices[0].message.content, str)
    genarm = _chat(client, extra_body={"steering": {"method": "genarm", "reward_models": {"same": 0.5}, "beta": 2.0}})
    assert genarm.model_extra["kaizen"]["steering"] == {"method": "genarm", "reward_models": {"same": 0.5}, "beta": 2.0}
    assert isinstance(genarm.choices[0].message.content, str)


@pytest.mark.parametrize(
    ("steering", "message"),
    [
        ({"method": "steerlm", "attributes": {"humor": 9}}, "humor"),
        ({"method": "steerlm", "attributes": {"sarcasm": 1}}, "sarcasm"),
        ({"method": "telepathy"}, "not one of"),
        ({"method": "genarm", "reward_models": {"nope": 1.0}}, "available: ['same']"),
        ({"method": "genarm", "beta": 0}, "beta must be > 0"),
        ({"method": "urial", "attributes": {}}, "do not apply"),
    ],
)
def test_bad_steering_is_a_400_that_says_what_is_allowed(deployment, steering, message) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    with pytest.raises(openai.BadRequestError) as error:
        _chat(openai_client(server), extra_body={"steering": steering})
    assert error.value.status_code == 400
    assert message in error.value.message


def test_promotion_is_followed_and_a_broken_checkpoint_does_not_take_the_server_down(deployment, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, server = deployment
    client = openai_client(server)
    assert _chat(client).system_fingerprint == "ckpt-0000"

    good = _checkpoint_copy(tiny_model_dir, settings.artifacts_dir / "checkpoints" / "ckpt-0001", scale=1.5)
    _register(sessions, "ckpt-0001", good)
    _promote(sessions, "ckpt-0001")
    assert _wait_for_fingerprint(client, "ckpt-0001") == "ckpt-0001"

    broken = _checkpoint_copy(tiny_model_dir, settings.artifacts_dir / "checkpoints" / "ckpt-0002", scale=0.5)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated after the manifest was written
    _register(sessions, "ckpt-0002", broken)
    _promote(sessions, "ckpt-0002")

    deadline = time.monotonic() + 30
    health = httpx.get(f"{server.base}/healthz").json()
    while health["last_swap_error"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
        health = httpx.get(f"{server.base}/healthz").json()
    assert health["last_swap_error"]["checkpoint_id"] == "ckpt-0002"
    assert "CheckpointError" in health["last_swap_error"]["error"]
    assert health["checkpoint_id"] == "ckpt-0001"
    assert httpx.get(f"{server.base}/readyz").status_code == 200
    assert _chat(client).system_fingerprint == "ckpt-0001"

    _promote(sessions, "ckpt-0000")  # a rollback is followed too
    assert _wait_for_fingerprint(client, "ckpt-0000") == "ckpt-0000"


def test_unknown_model_and_oversized_max_tokens_are_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    client = openai_client(server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="serve.max_new_tokens"):
        client.chat.completions.create(model="kaizen", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)


def _stream_lines(server: Server) -> Iterator[str]:
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json={"model": "kaizen", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        yield from response.iter_lines()


def test_sse_stream_ends_with_done(deployment) -> None:  # type: ignore[no-untyped-def]
    _, _, server = deployment
    lines = [line for line in _stream_lines(server) if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_serve_dtype_bfloat16_loads_the_champion_in_bfloat16_and_serves_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    from daemon.bootstrap import initialise
    from daemon.serving.champion import load_verified
    from tests.serving.harness import serve_settings

    settings = serve_settings(tmp_path, tiny_model_dir, dtype="bfloat16")
    sessions = initialise(settings)
    with sessions() as session:
        champion_path = lineage.current_champion(session).path
    assert load_verified(settings, champion_path).model.dtype == torch.bfloat16
    assert load_verified(serve_settings(tmp_path, tiny_model_dir), champion_path).model.dtype == torch.float32
    with Server(settings) as server:
        reply = _chat(openai_client(server))
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
