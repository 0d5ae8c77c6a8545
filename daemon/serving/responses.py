"""OpenAI response bodies: completions, chat completions, their stream chunks, logprobs and usage.

Log-probabilities are the model's own (log-softmax of its logits, before temperature, penalties
or grammar masks), as vLLM reports them by default. A token's ``bytes`` are its raw bytes (a
byte-level token can be part of a UTF-8 character); its ``token`` is those bytes decoded with
replacement. EOS is counted in ``completion_tokens`` but has no logprobs entry (it adds no text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.batch_engine import TokenInfo
from workers.detokenize import token_bytes, token_text


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class Envelope:
    """What every body of one response shares."""

    ident: str
    created: int
    model_name: str
    checkpoint_id: str
    kaizen: dict[str, Any]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_token_entry(tokenizer: Any, token: TokenInfo) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob, "bytes": token_bytes(tokenizer, token_id)}

    return {**one(token.token_id, token.logprob or 0.0), "top_logprobs": [one(t, lp) for t, lp in token.top]}


def chat_logprobs(tokenizer: Any, tokens: list[TokenInfo], wanted: bool) -> dict[str, Any] | None:
    return {"content": [chat_token_entry(tokenizer, t) for t in tokens]} if wanted else None


def completion_logprobs(tokenizer: Any, tokens: list[TokenInfo | None], start_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; a token without a log-prob (the first prompt token, which
    nothing predicts) gets null entries; None items (text released at the end) are skipped."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for token in tokens:
        if token is None:
            continue
        text = token_text(tokenizer, token.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(token.logprob)
        out["top_logprobs"].append(None if token.logprob is None else {token_text(tokenizer, t): lp for t, lp in token.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_completion(env: Envelope, choices: list[ChoiceResult], tokenizer: Any, want_logprobs: bool, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": env.ident, "object": "chat.completion", "created": env.created, "model": env.model_name,
        "system_fingerprint": env.checkpoint_id,
        "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": chat_logprobs(tokenizer, c.tokens, want_logprobs)}
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
        "kaizen": env.kaizen,
    }


def text_completion(env: Envelope, choices: list[ChoiceResult], logprobs: list[dict[str, Any] | None], prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": env.ident, "object": "text_completion", "created": env.created, "model": env.model_name,
        "system_fingerprint": env.checkpoint_id,
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": lp} for c, lp in zip(choices, logprobs, strict=True)],
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
        "kaizen": env.kaizen,
    }


def _chunk(env: Envelope, obj: str, choice: dict[str, Any], with_usage_field: bool, first: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": env.ident, "object": obj, "created": env.created, "model": env.model_name,
        "system_fingerprint": env.checkpoint_id, "choices": [choice],
    }
    if with_usage_field:
        chunk["usage"] = None  # include_usage: every chunk has the field, only the last one fills it
    if first:
        chunk["kaizen"] = env.kaizen
    return chunk


def chat_chunk(env: Envelope, index: int, delta: dict[str, Any], *, finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None, with_usage_field: bool = False, first: bool = False) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    return _chunk(env, "chat.completion.chunk", choice, with_usage_field, first)


def text_chunk(env: Envelope, index: int, text: str, *, finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None, with_usage_field: bool = False, first: bool = False) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    return _chunk(env, "text_completion", choice, with_usage_field, first)


def usage_chunk(env: Envelope, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": env.ident, "object": obj, "created": env.created, "model": env.model_name, "system_fingerprint": env.checkpoint_id,
        "choices": [], "usage": usage(prompt_tokens, completion_tokens),
    }
