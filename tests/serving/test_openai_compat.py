"""The openai client against the real server: every supported parameter, with its semantics."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from tests.serving.harness import openai_client
from workers.detokenize import token_bytes
from workers.runtime import ModelRuntime

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture()
def server(deployment):  # type: ignore[no-untyped-def]
    return deployment[2]


@pytest.fixture()
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai_client(server)


@pytest.fixture(scope="module")
def runtime(tiny_model_dir) -> ModelRuntime:  # type: ignore[no-untyped-def]
    return ModelRuntime.load(str(tiny_model_dir), device="cpu")


def _ids_from_bytes(runtime: ModelRuntime, entries) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids back from the logprobs entries' bytes (each entry is one vocabulary token)."""
    by_bytes = {tuple(token_bytes(runtime.tokenizer, i)): i for i in range(len(runtime.tokenizer))}
    return [by_bytes[tuple(e.bytes)] for e in entries]


def test_chat_logprobs_are_the_models_teacher_forced_logprobs(client, runtime) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert reply.choices[0].finish_reason == "length" and len(entries) == reply.usage.completion_tokens == 10
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == reply.choices[0].message.content
    prompt_ids = runtime.context_ids(runtime.render_chat(MESSAGES))
    assert reply.usage.prompt_tokens == len(prompt_ids)
    ids = _ids_from_bytes(runtime, entries)
    with torch.no_grad():
        logprobs = runtime.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float().log_softmax(-1)
    expected = [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(ids)]
    assert [e.logprob for e in entries] == pytest.approx(expected, abs=1e-4)
    assert sum(e.logprob for e in entries) == pytest.approx(sum(expected), abs=1e-3)
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy


def test_completion_logprobs_with_echo_score_the_prompt_too(client, runtime) -> None:  # type: ignore[no-untyped-def]
    prompt = "Once upon a time"
    reply = client.completions.create(model="kaizen", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = reply.choices[0]
    prompt_ids = runtime.context_ids(prompt)
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset)
    scored = runtime.token_logprobs([runtime.tokenizer.decode(prompt_ids[:1])], [runtime.tokenizer.decode(prompt_ids[1:])])[0]
    assert lp.token_logprobs[1 : len(prompt_ids)] == pytest.approx(scored, abs=1e-4)


def test_include_usage_counts_equal_the_tokenizers_and_a_cut_stream_ends_with_length(client, runtime) -> None:  # type: ignore[no-untyped-def]
    chunks = list(client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True}))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == len(runtime.context_ids(runtime.render_chat(MESSAGES)))
    assert chunks[-1].usage.completion_tokens == 7
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=7, temperature=0)
    assert text == plain.choices[0].message.content and plain.choices[0].finish_reason == "length"


def test_a_json_schema_is_respected(client) -> None:  # type: ignore[no-untyped-def]
    schema = {
        "type": "object",
        "properties": {"c": {"type": "string", "maxLength": 3}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["c", "n"], "additionalProperties": False,
    }
    for seed in range(3):
        reply = client.chat.completions.create(
            model="kaizen", messages=MESSAGES, max_tokens=24, seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        # The grammar spells the keys out token by token; 24 tokens are enough for this schema.
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # json_object: any object. A random model may spend its 24 tokens on one long key, so only a
    # finished answer must parse; either way it is an object from its first character.
    for seed in range(3):
        obj = client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=24, seed=seed, response_format={"type": "json_object"})
        assert obj.choices[0].message.content.startswith("{")
        if obj.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_a_schema_no_grammar_can_express_is_a_400_with_the_reason(client) -> None:  # type: ignore[no-untyped-def]
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError, match="json_schema cannot be used.*no-such-type") as raised:
        client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=4, response_format=bad)
    assert raised.value.body["param"] == "response_format"


def test_stop_strings_apply_to_generated_text_only(client) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    plain = client.completions.create(model="kaizen", prompt=prompt, max_tokens=10, temperature=0).choices[0]
    across = next(prompt[-k:] + plain.text[:2] for k in range(1, len(prompt)) if prompt[-k:] + plain.text[:2] not in plain.text)
    cut = client.completions.create(model="kaizen", prompt=prompt, max_tokens=10, temperature=0, stop=[across]).choices[0]
    assert (cut.text, cut.finish_reason) == (plain.text, plain.finish_reason)
    inside = plain.text[3:6]
    stopped = client.completions.create(model="kaizen", prompt=prompt, max_tokens=10, temperature=0, stop=inside).choices[0]
    assert (stopped.text, stopped.finish_reason) == (plain.text[: plain.text.find(inside)], "stop")


def test_penalties_change_the_output_and_logit_bias_forces_a_token(client, runtime) -> None:  # type: ignore[no-untyped-def]
    base = dict(model="kaizen", prompt="is is is is", max_tokens=12, temperature=0)
    plain = client.completions.create(**base).choices[0].text
    penalised = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalised != plain
    token = runtime.encode_completion(" water")[0]
    forced = client.completions.create(**base, logit_bias={str(token): 100}).choices[0].text
    assert forced == runtime.tokenizer.decode([token] * 12)


def test_prompt_lists_token_ids_and_n_give_one_choice_each(client, runtime) -> None:  # type: ignore[no-untyped-def]
    ids = runtime.context_ids("Once upon a time")
    reply = client.completions.create(model="kaizen", prompt=["Once upon a time", "Hi"], max_tokens=3, n=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    by_ids = client.completions.create(model="kaizen", prompt=ids, max_tokens=5, temperature=0).choices[0].text
    by_text = client.completions.create(model="kaizen", prompt="Once upon a time", max_tokens=5, temperature=0).choices[0].text
    assert by_ids == by_text
    assert reply.usage.prompt_tokens == len(ids) + len(runtime.context_ids("Hi"))


def test_unseeded_requests_sample_afresh_and_seeded_ones_repeat(client) -> None:  # type: ignore[no-untyped-def]
    texts = {client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=12, temperature=1.0).choices[0].message.content for _ in range(4)}
    assert len(texts) > 1
    seeded = {client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=5).choices[0].message.content for _ in range(2)}
    assert len(seeded) == 1


@pytest.mark.parametrize("steering", [{"method": "urial"}, {"method": "steerlm", "attributes": {"humor": 3}}, {"method": "genarm", "reward_models": {"same": 0.5}}])
def test_steered_answers_are_identical_streamed_and_not(client, steering) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model="kaizen", messages=MESSAGES, max_tokens=16, seed=11, extra_body={"steering": steering})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(**kwargs, stream=True) if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole
    if steering["method"] == "genarm" and len(whole) > 3:
        assert len(pieces) > 1, "GenARM must stream token by token"


def test_models_retrieve_and_tools_are_refused_by_name(client) -> None:  # type: ignore[no-untyped-def]
    assert client.models.retrieve("kaizen").id == "kaizen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="kaizen", messages=MESSAGES, tools=[tool])


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/nowhere", None, 404),
        ("PUT", "/v1/models", None, 405),
        ("POST", "/v1/chat/completions", {"model": "kaizen"}, 400),
        ("POST", "/v1/chat/completions", {"model": "kaizen", "messages": MESSAGES, "seed": 2**64}, 400),
        ("POST", "/v1/chat/completions", {"model": "kaizen", "messages": [{"role": "user", "content": "\ud800"}]}, 400),
        ("POST", "/v1/completions", {"model": "kaizen", "prompt": [10**9]}, 400),
        ("POST", "/v1/completions", {"model": "kaizen", "prompt": "x", "max_tokens": 24, "stop": "x", "suffix": "y"}, 400),
        ("POST", "/v1/completions", {"model": "kaizen", "prompt": [5] * 2040, "max_tokens": 24}, 400),  # 2040 + 24 > 2048
    ],
)
def test_every_error_has_openais_shape(server, method, path, body, status) -> None:  # type: ignore[no-untyped-def]
    content = None if body is None else json.dumps(body)  # json.dumps keeps a lone surrogate as \ud800
    response = httpx.request(method, f"{server.base}{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if isinstance(body, dict) and len(body.get("prompt", "")) == 2040:
        assert error["code"] == "context_length_exceeded" and "2048" in error["message"]


def test_inputs_that_used_to_crash_are_answered(server) -> None:  # type: ignore[no-untyped-def]
    tiny_t = httpx.post(f"{server.base}/v1/chat/completions", json={"model": "kaizen", "messages": MESSAGES, "max_tokens": 3, "temperature": 1e-300})
    assert tiny_t.status_code == 200
    top_p_zero = httpx.post(f"{server.base}/v1/chat/completions", json={"model": "kaizen", "messages": MESSAGES, "max_tokens": 3, "top_p": 0})
    assert top_p_zero.status_code == 200
    huge = httpx.post(f"{server.base}/v1/chat/completions", content=b"{" + b" " * 2_000_000 + b"}", headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
