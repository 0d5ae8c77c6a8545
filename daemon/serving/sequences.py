"""A job's choices as batch-engine sequences: sampling settings, seeds, score processors, GenARM guidance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from daemon.serving.protocol import DecodeParams
from workers.batch_engine import RowProcessor, SamplingSpec
from workers.runtime import ModelRuntime
from workers.steering import Decoder

if TYPE_CHECKING:
    from workers.genarm import RewardGuidance


def sampling_spec(params: DecodeParams, decoder: Decoder, seed: int | None) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=seed,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logit_bias=params.logit_bias, logprobs=params.logprobs, stops=tuple(decoder.stops(params.stop)),
    )


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Choice i of a seeded request uses seed + i (wrapped into the generator's range), so choices differ."""
    if seed is None:
        return [None] * n
    return [((seed + i + 2**63) % 2**64) - 2**63 for i in range(n)]


class Adjustments(NamedTuple):
    """What changes a sequence's logits at every token, in the form its engine takes."""

    processors: list[RowProcessor]
    reward_guidance: RewardGuidance | None = None
    json_schema: dict[str, Any] | None = None


def per_token_adjustments(runtime: ModelRuntime, decoder: Decoder, prompt_ids: list[int], params: DecodeParams, vocab: int) -> Adjustments:
    """On an engine that runs per-sequence processors (HF): all of them (GenARM, the JSON
    grammar). On vLLM: no processors, the steering method's GenARM guidance for the engine's own
    logits processor, and the checked JSON schema for vLLM's structured outputs. Raises
    ValueError for a schema no grammar can express."""
    if runtime.runs_logits_processors:
        return Adjustments(processors_for(runtime, decoder, prompt_ids, params, vocab))
    schema = None
    if params.json_schema is not None:
        from workers.grammar import checked_json_schema

        schema = checked_json_schema(params.json_schema)
    return Adjustments([], decoder.reward_guidance(), schema)


def processors_for(runtime: ModelRuntime, decoder: Decoder, prompt_ids: list[int], params: DecodeParams, vocab: int) -> list[RowProcessor]:
    """Per-sequence score processors, in order: the steering method's (GenARM), then the JSON grammar."""
    processors: list[RowProcessor] = list(decoder.processors(prompt_ids))
    if params.json_schema is not None:
        from workers.grammar import json_schema_processor

        processors.append(json_schema_processor(runtime.tokenizer, vocab, params.json_schema, len(prompt_ids)))
    return processors


def vocab_width(runtime: ModelRuntime) -> int:
    """The width of the model's logits (can exceed the tokenizer's length)."""
    return runtime.logits_width
