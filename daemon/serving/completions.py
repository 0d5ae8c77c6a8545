"""The two completion endpoints: request -> job -> a JSON body or an SSE stream.

A stream's last event per choice carries its real ``finish_reason`` (``length`` when cut by
``max_tokens``); with ``stream_options.include_usage`` a final chunk with empty ``choices``
carries the usage, and every chunk before it has ``"usage": null``, as OpenAI sends them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from daemon.serving import responses
from daemon.serving.champion import ServedModel
from daemon.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body
from daemon.serving.service import Job, Prompt, Run, Serving
from policies.steering import SteeringSpec


async def chat_completion(serving: Serving, req: ChatCompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    messages = req.chat_messages()

    def render(model: ServedModel, spec: SteeringSpec, budget: int) -> list[Prompt]:
        text = serving.methods[spec.method].render_chat(model.runtime, messages, spec, max_new_tokens=budget)
        return [serving.text_prompt(model, text)]

    job = serving.prepare(req, "chatcmpl", render)
    tokenizer = job.model.runtime.tokenizer
    want_logprobs = job.params.logprobs is not None
    if req.stream:
        return _sse(_chat_stream(job, serving.start(job), tokenizer, want_logprobs, req.include_usage))
    choices = await serving.collect(job, request)
    return responses.chat_completion(job.envelope, choices, tokenizer, want_logprobs, job.prompt_tokens)


async def completion(serving: Serving, req: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    def render(model: ServedModel, spec: SteeringSpec, budget: int) -> list[Prompt]:
        out = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                out.append(serving.text_prompt(model, serving.methods[spec.method].render_completion(model.runtime, prompt, spec, max_new_tokens=budget)))
            else:
                out.append(serving.ids_prompt(model, prompt))
        return out

    job = serving.prepare(req, "cmpl", render)
    tokenizer = job.model.runtime.tokenizer
    if req.stream:
        return _sse(_text_stream(job, serving.start(job), tokenizer, req.echo, req.include_usage))
    choices = await serving.collect(job, request)
    logprobs: list[dict[str, Any] | None] = []
    n = job.params.n
    for choice in choices:
        prompt = job.prompts[choice.index // n]
        if req.echo:
            choice.text = prompt.text + choice.text
        if job.params.logprobs is None:
            logprobs.append(None)
            continue
        scored = await serving.prompt_logprobs(job, prompt, job.params.logprobs) if req.echo else []
        logprobs.append(responses.completion_logprobs(tokenizer, [*scored, *choice.tokens]))
    return responses.text_completion(job.envelope, choices, logprobs, job.prompt_tokens)


async def _chat_stream(job: Job, run: Run, tokenizer: Any, want_logprobs: bool, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    env = job.envelope
    for index in range(len(job.prompts) * job.params.n):
        yield responses.chat_chunk(env, index, {"role": "assistant", "content": ""}, with_usage_field=include_usage, first=index == 0)
    completion_tokens = 0
    async for event in run.events():
        if event.kind == "token":
            entry = responses.chat_logprobs(tokenizer, [event.token], True) if want_logprobs and event.token is not None else None
            if event.piece or entry:
                yield responses.chat_chunk(env, event.index, {"content": event.piece}, logprobs=entry, with_usage_field=include_usage)
        elif event.kind == "finish":
            completion_tokens += event.num_tokens
            yield responses.chat_chunk(env, event.index, {}, finish_reason=event.reason, with_usage_field=include_usage)
        else:
            yield error_body(f"generation failed: {type(event.error).__name__}: {event.error}", "server_error")
            return
    if include_usage:
        yield responses.usage_chunk(env, "chat.completion.chunk", job.prompt_tokens, completion_tokens)


async def _text_stream(job: Job, run: Run, tokenizer: Any, echo: bool, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    env = job.envelope
    want_logprobs = job.params.logprobs is not None
    n = job.params.n
    for index in range(len(job.prompts) * n):
        first_text = job.prompts[index // n].text if echo else ""
        if first_text or index == 0:
            yield responses.text_chunk(env, index, first_text, with_usage_field=include_usage, first=index == 0)
    completion_tokens = 0
    async for event in run.events():
        if event.kind == "token":
            entry = responses.completion_logprobs(tokenizer, [event.token]) if want_logprobs and event.token is not None else None
            if event.piece or entry:
                yield responses.text_chunk(env, event.index, event.piece, logprobs=entry, with_usage_field=include_usage)
        elif event.kind == "finish":
            completion_tokens += event.num_tokens
            yield responses.text_chunk(env, event.index, "", finish_reason=event.reason, with_usage_field=include_usage)
        else:
            yield error_body(f"generation failed: {type(event.error).__name__}: {event.error}", "server_error")
            return
    if include_usage:
        yield responses.usage_chunk(env, "text_completion", job.prompt_tokens, completion_tokens)


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
