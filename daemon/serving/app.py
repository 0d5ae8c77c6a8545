"""OpenAI-compatible HTTP API for the current champion, with per-request steering.

Endpoints: ``/v1/models`` and ``/v1/models/{id}``, ``/v1/chat/completions``, ``/v1/completions``
(both streaming with SSE when ``stream`` is true), ``/healthz`` (the process is up; reports swap
errors and queue depth), ``/readyz`` (a model is loaded) and ``/metrics`` (Prometheus text). Every
completion names the checkpoint that produced it in ``system_fingerprint`` and in the extra
``kaizen`` object. Every error, whatever its status, has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

The routes are thin: :class:`daemon.serving.service.Serving` holds the state and the batch engines,
:mod:`daemon.serving.completions` builds the answers. Handlers are ``async`` and never decode in
the event loop, so health checks are answered while generations queue.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import http_security
from daemon.config import Settings
from daemon.serving import completions
from daemon.serving.champion import ChampionWatcher
from daemon.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ErrorResponse, error_body
from daemon.serving.service import Serving
from workers.steering import SteeringMethods

log = structlog.get_logger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                         (413, "body too large"), (500, "server error"), (503, "no model loaded or at capacity")]
}
# A completion is JSON, or an SSE stream when the request says "stream": true.
_COMPLETION = {200: {"description": "a completion, or its SSE stream", "content": {"application/json": {}, "text/event-stream": {}}}}
_STATUS_KINDS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def _error(status: int, message: str, kind: str | None = None, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = kind or _STATUS_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def create_serving_app(settings: Settings, watcher: ChampionWatcher, methods: SteeringMethods) -> FastAPI:
    serving = Serving(settings, watcher, methods)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        watcher.refresh()  # serve at once if the champion loads; /readyz says 503 until one does
        watcher.start()
        yield
        watcher.stop()
        serving.stop()

    app = FastAPI(title="kaizen", lifespan=lifespan, responses=_ERRORS)
    _install_error_handlers(app)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.serve.api_key)
    # Outermost: a request under a foreign Host name (DNS rebinding) is refused before anything else.
    allowed = http_security.allowed_hosts(settings.serve.allowed_hosts, settings.serve.host)
    app.add_middleware(http_security.TrustedHostMiddleware, allowed_hosts=allowed)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.serve.max_body_bytes)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return serving.health()

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        current = watcher.current
        if current is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "checkpoint_id": current.checkpoint_id})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return _metrics_text(serving)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": serving.models()}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return serving.model_card(model_id)

    @app.post("/v1/chat/completions", response_model=None, responses=_COMPLETION)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        return await completions.chat_completion(serving, req, request)

    @app.post("/v1/completions", response_model=None, responses=_COMPLETION)
    async def text_completions(req: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        return await completions.completion(serving, req, request)

    app.state.watcher = watcher
    app.state.serving = serving
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = str(first["msg"]).removeprefix("Value error, ")
        return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serve.unhandled_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log", "server_error")


def _metrics_text(serving: Serving) -> str:
    engines = serving.engines()
    lines = [
        "# TYPE kaizen_serve_running gauge", f"kaizen_serve_running {sum(e.running for e in engines)}",
        "# TYPE kaizen_serve_waiting gauge", f"kaizen_serve_waiting {sum(e.waiting for e in engines)}",
    ]
    for stat in ("steps", "tokens", "admitted", "finished", "cancelled"):
        lines += [f"# TYPE kaizen_serve_{stat}_total counter", f"kaizen_serve_{stat}_total {sum(e.stats[stat] for e in engines)}"]
    return "\n".join(lines) + "\n"


class ApiKeyMiddleware:
    """``Authorization: Bearer <serve.api_key>`` on /v1/ routes when a key is set (pure ASGI, so
    streaming responses still see client disconnects)."""

    def __init__(self, app: ASGIApp, api_key: Any) -> None:
        self.app = app
        secret = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
        self.expected = f"Bearer {secret}".encode() if secret else None
        self.failures = http_security.FailureLimiter()  # a few wrong keys a minute per address, then 429

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            import hmac

            client = (scope.get("client") or ("unknown",))[0]
            wait = self.failures.blocked_for(client)
            if wait:
                await _error(429, f"too many invalid API keys from {client}; try again in {wait:.0f}s", "rate_limit_error")(scope, receive, send)
                return
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.failures.failed(client)
                await _error(401, "invalid or missing API key", "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``serve.max_body_bytes``, by Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(), code="body_too_large")
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes (serve.max_body_bytes)"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, self._message(), code="body_too_large")(scope, receive, send)
