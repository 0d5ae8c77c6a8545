"""OpenAI-compatible HTTP API for the current champion, with per-request steering.

Endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (both streaming with
SSE when ``stream`` is true), ``/healthz`` (the process is up; reports swap errors) and ``/readyz``
(a model is loaded). Every completion names the checkpoint that produced it in
``system_fingerprint`` and in the extra ``kaizen`` object.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from daemon.config import Settings
from daemon.serving.champion import ChampionWatcher, ServedModel
from policies.steering import SteeringError, SteeringSpec
from workers.steering import DecodeParams, Decoder, SteeringMethods

log = structlog.get_logger(__name__)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class _SamplingRequest(BaseModel):
    # Unknown OpenAI parameters (logprobs, presence_penalty, ...) are accepted and ignored, as
    # clients send them by default; the ones below are honoured.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    steering: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_SamplingRequest):
    prompt: str


@dataclass(frozen=True)
class _Prepared:
    model: ServedModel
    spec: SteeringSpec
    params: DecodeParams
    prompt: str
    decoder: Decoder


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def create_serving_app(settings: Settings, watcher: ChampionWatcher, methods: SteeringMethods) -> FastAPI:
    serve = settings.serve

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        watcher.refresh()  # serve at once if the champion loads; /readyz says 503 until one does
        watcher.start()
        yield
        watcher.stop()

    app = FastAPI(title="kaizen", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(_error_body(f"{param}: {first['msg']}", "invalid_request_error", param), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if serve.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {serve.api_key}":
                return JSONResponse(_error_body("invalid or missing API key", "authentication_error"), status_code=401)
        return await call_next(request)

    def served() -> ServedModel:
        current = watcher.current
        if current is None:
            failure = watcher.last_failure
            detail = f": {failure.error}" if failure else ""
            raise ApiError(503, f"no model loaded yet{detail}", kind="service_unavailable")
        return current

    def steering(raw: dict[str, Any] | None) -> SteeringSpec:
        try:
            return methods.parse(raw)
        except SteeringError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None

    def params(req: _SamplingRequest) -> DecodeParams:
        limit = serve.max_new_tokens
        requested = req.max_completion_tokens or req.max_tokens or limit
        if requested > limit:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit {limit} (serve.max_new_tokens)", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        temperature = settings.generation.temperature if req.temperature is None else req.temperature
        top_p = settings.generation.top_p if req.top_p is None else req.top_p
        return DecodeParams(requested, temperature, top_p, req.n, req.seed, tuple(stop))

    def check_model(name: str, model: ServedModel) -> None:
        if name not in (serve.model_name, model.checkpoint_id):
            raise ApiError(404, f"model {name!r} is not served here; use {serve.model_name!r} (the current champion)", param="model", kind="not_found_error")

    def decoder(spec: SteeringSpec, model: ServedModel) -> Decoder:
        try:
            return methods[spec.method].decoder(model.runtime, spec)
        except SteeringError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None

    def metadata(model: ServedModel, spec: SteeringSpec) -> dict[str, Any]:
        return {"checkpoint_id": model.checkpoint_id, "steering": spec.describe()}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        failure = watcher.last_failure
        current = watcher.current
        return {
            "status": "ok",
            "checkpoint_id": current.checkpoint_id if current else None,
            "last_swap_error": None if failure is None else {"checkpoint_id": failure.checkpoint_id, "error": failure.error},
        }

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        current = watcher.current
        if current is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "checkpoint_id": current.checkpoint_id})

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        model = served()
        return {
            "object": "list",
            "data": [{"id": serve.model_name, "object": "model", "created": int(model.loaded_at), "owned_by": "kaizen", "checkpoint_id": model.checkpoint_id}],
        }

    def prepare(req: _SamplingRequest, render: Callable[[ServedModel, SteeringSpec], str]) -> _Prepared:
        """Everything both completion endpoints check and build before decoding."""
        model = served()
        check_model(req.model, model)
        spec = steering(req.steering)
        decode_params = params(req)
        try:
            prompt = render(model, spec)
        except ValueError as exc:  # e.g. a URIAL chat that does not end with a user turn
            raise ApiError(400, str(exc), param="messages") from None
        return _Prepared(model, spec, decode_params, prompt, decoder(spec, model))

    def respond(job: _Prepared, stream: bool, kind: str, chunks: Callable[..., Iterator[dict[str, Any]]], choice: Callable[[int, Any], dict[str, Any]]) -> dict[str, Any] | StreamingResponse:
        ident, created = f"{kind}-{uuid.uuid4().hex}", int(time.time())
        if stream:
            pieces = job.decoder.stream(job.prompt, _single(job.params))
            return _sse(chunks(ident, created, serve.model_name, job.model, job.spec, pieces))
        generations = job.decoder.decode(job.prompt, job.params)
        return {
            "id": ident, "object": "chat.completion" if kind == "chatcmpl" else "text_completion", "created": created,
            "model": serve.model_name, "system_fingerprint": job.model.checkpoint_id,
            "choices": [choice(i, g) for i, g in enumerate(generations)],
            "usage": _usage(job.model, job.prompt, generations),
            "kaizen": metadata(job.model, job.spec),
        }

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
        job = prepare(req, lambda model, spec: methods[spec.method].render_chat(model.runtime, messages, spec))
        return respond(job, req.stream, "chatcmpl", _chat_chunks, lambda i, g: {
            "index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": _finish(g), "logprobs": None,
        })

    @app.post("/v1/completions", response_model=None)
    def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        job = prepare(req, lambda model, spec: methods[spec.method].render_completion(model.runtime, req.prompt, spec))
        return respond(job, req.stream, "cmpl", _text_chunks, lambda i, g: {
            "index": i, "text": g.text, "finish_reason": _finish(g), "logprobs": None,
        })

    app.state.watcher = watcher
    return app


def _single(params: DecodeParams) -> DecodeParams:
    if params.n != 1:
        raise ApiError(400, "streaming supports n=1 only", param="n")
    return params


def _finish(generation: Any) -> str:
    return "stop" if generation.finished else "length"


def _usage(model: ServedModel, prompt: str, generations: list[Any]) -> dict[str, int]:
    prompt_tokens = len(model.runtime.encode_prompt(prompt))
    completion_tokens = sum(g.num_tokens for g in generations)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _sse(events: Iterator[dict[str, Any]]) -> StreamingResponse:
    def body() -> Iterator[str]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat_chunks(ident: str, created: int, name: str, model: ServedModel, spec: SteeringSpec, pieces: Iterator[str]) -> Iterator[dict[str, Any]]:
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": model.checkpoint_id}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
           "kaizen": {"checkpoint_id": model.checkpoint_id, "steering": spec.describe()}}
    for piece in pieces:
        yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


def _text_chunks(ident: str, created: int, name: str, model: ServedModel, spec: SteeringSpec, pieces: Iterator[str]) -> Iterator[dict[str, Any]]:
    base = {"id": ident, "object": "text_completion", "created": created, "model": name, "system_fingerprint": model.checkpoint_id}
    for piece in pieces:
        yield {**base, "choices": [{"index": 0, "text": piece, "finish_reason": None}], "kaizen": {"checkpoint_id": model.checkpoint_id, "steering": spec.describe()}}
    yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
