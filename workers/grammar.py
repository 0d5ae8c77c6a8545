"""``response_format`` json_object / json_schema: decoding constrained by llguidance.

llguidance compiles the JSON schema to a grammar and gives, at every step, the set of tokens that
keep the output a valid prefix of a matching JSON document. Tokens outside it get -inf before
sampling; once the document is complete only EOS is allowed. Whitespace between JSON tokens is
not allowed (``whitespace_flexible: false``): a model cannot then spend its token budget on
spaces, and the output is compact JSON.
"""

from __future__ import annotations

import json
import threading
import weakref
from functools import lru_cache
from typing import Any

import torch

_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()
_COMPILE_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The schema cannot be compiled to a grammar; the message says why."""


def _ll_tokenizer(tokenizer: Any, vocab_width: int) -> Any:
    import llguidance.hf

    with _tokenizers_lock:  # building one takes about a second: once per loaded tokenizer
        cached = _tokenizers.get(tokenizer)
        if cached is None or cached[0] != vocab_width:
            cached = (vocab_width, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_width))
            _tokenizers[tokenizer] = cached
        return cached[1]


def checked_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a sequence is constrained to (``{}``, json_object, means any JSON object), once
    llguidance has compiled it: an engine that constrains decoding itself (vLLM's structured
    outputs) gets it, and a schema no grammar can express is refused before any decoding."""
    target = _target(schema)
    error = _validation_error(_grammar(target))
    if error:
        raise GrammarError(f"response_format json_schema cannot be used: {error}")
    return target


@lru_cache(maxsize=256)
def _validation_error(grammar: str) -> str:
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar)


def _target(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema decoded against: ``{}`` (response_format json_object) is any JSON object."""
    return schema if schema else {"type": "object"}


def _grammar(target: dict[str, Any]) -> str:
    """The grammar of ``target``; the n choices of a request, and later requests, with one schema
    share one compilation."""
    return _compiled_grammar(json.dumps(target, sort_keys=True))


@lru_cache(maxsize=256)
def _compiled_grammar(canonical_schema: str) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(canonical_schema), defaults=_COMPILE_OPTIONS)
    except ValueError as exc:
        raise GrammarError(f"response_format json_schema is not a valid JSON schema: {exc}") from None


def json_schema_processor(tokenizer: Any, vocab_width: int, schema: dict[str, Any], prompt_length: int) -> JsonConstraint:
    """A per-sequence processor for the engine; ``schema`` ``{}`` means any JSON object."""
    import llguidance

    grammar = _grammar(_target(schema))
    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_width), grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(f"response_format json_schema cannot be used: {matcher.get_error()}")
    return JsonConstraint(matcher, vocab_width, prompt_length)


class JsonConstraint:
    """Masks the scores of one sequence to what its grammar allows next."""

    def __init__(self, matcher: Any, vocab_width: int, prompt_length: int) -> None:
        import llguidance.torch

        self.matcher = matcher
        self.vocab_width = vocab_width
        self._consumed = prompt_length
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_width)
        self._bits = torch.arange(32, dtype=torch.int32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.torch

        for token in input_ids[0, self._consumed :].tolist():
            self.matcher.consume_token(int(token))
        self._consumed = input_ids.shape[1]
        if self.matcher.is_error():
            return scores  # an inconsistent state: leave the scores alone rather than mask everything
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        allowed = ((self._bitmask[0].unsqueeze(-1) >> self._bits) & 1).flatten()[: scores.shape[-1]].bool()
        if allowed.shape[0] < scores.shape[-1]:
            allowed = torch.cat([allowed, allowed.new_zeros(scores.shape[-1] - allowed.shape[0])])
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
