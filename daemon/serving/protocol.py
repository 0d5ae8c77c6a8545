"""The OpenAI protocol as this server speaks it: request models, their decode parameters, and the
error shape every error (400 ... 500) is answered with.

Unknown fields are ignored (clients send ``user``, ``metadata``, ``store``... by default). Fields
the server cannot honour are refused with a 400 naming them rather than accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, StringConstraints, field_validator, model_validator

from workers.steering import DecodeParams

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered with OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Documented in the OpenAPI schema for every error status."""

    error: ErrorDetail


def _refuse_surrogates(text: str, where: str) -> str:
    # A lone UTF-16 surrogate ("\ud800") is valid JSON but not text: the tokenizer cannot encode it.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ValueError(f"{where} contains a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text")
    return text


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]  # no "tool": tool calls are not implemented
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _valid_text(self) -> ChatMessage:
        if isinstance(self.content, str):
            _refuse_surrogates(self.content, "message content")
        elif self.content:
            for part in self.content:
                _refuse_surrogates(part.text, "message content")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    temperature: float
    top_p: float


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    # Tool calling is not implemented: the schema says so (no items), and a request with tools is
    # refused with a 400 that names them instead of being answered as if none were sent.
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: Literal["none", "auto"] | None = None
    functions: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: Literal["none", "auto"] | None = None
    steering: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        for stop in stops:
            _refuse_surrogates(stop, "stop")
        return value

    def refuse_unsupported(self) -> None:
        """Tool calling is not implemented: say so instead of answering as if no tools were sent."""
        if self.tools or self.functions:
            raise ApiError(400, "tools/functions are not supported by this server (no tool-call parsing); send the request without them", param="tools")

    def logprobs_count(self) -> int | None:
        return None

    def to_decode_params(self, limits: Limits) -> DecodeParams:
        self.refuse_unsupported()
        requested = self.max_completion_tokens or self.max_tokens or limits.max_new_tokens
        if requested > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit {limits.max_new_tokens} (serve.max_new_tokens)", param="max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fmt = self.response_format
        schema = None
        if fmt is not None and fmt.type == "json_object":
            schema = {}
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_
        return DecodeParams(
            max_tokens=requested,
            temperature=limits.temperature if self.temperature is None else self.temperature,
            top_p=limits.top_p if self.top_p is None else self.top_p,
            n=self.n, seed=self.seed, stop=tuple(s for s in stop if s),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs_count(),
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items())),
            json_schema=schema,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


Prompt = str | list[int]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | Annotated[list[NonNegativeInt], Field(min_length=1)] | list[Annotated[list[NonNegativeInt], Field(min_length=1)]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        prompts = value if isinstance(value, list) else [value]
        if not prompts:
            raise ValueError("prompt must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [prompts]
        for prompt in prompts:
            if isinstance(prompt, str):
                _refuse_surrogates(prompt, "prompt")
            elif not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError(shape)
            elif not prompt:
                raise ValueError("a token-id prompt must not be empty")
            elif any(t < 0 for t in prompt):
                raise ValueError("token ids must be >= 0")
        if len({isinstance(p, str) for p in prompts}) > 1:
            raise ValueError(shape + " (not strings and token ids mixed)")
        return value

    def prompts(self) -> list[Prompt]:
        """One prompt per choice group: a string, or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server; omit it", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported by this server; omit it", param="best_of")
