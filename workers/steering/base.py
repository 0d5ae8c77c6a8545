"""What every steering method implements, and the plain sampling decoder most of them use.

A method turns a validated request into a prompt (``render_chat`` / ``render_completion``) and
gives the decoder for it (``decoder``). The defaults are the unsteered behaviour (the model's own
chat template, raw completion text, plain sampling with the caller's stop strings), so a method
overrides only what it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from policies.steering import SteeringSpec, check_keys

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from daemon.config import ServeSettings
    from workers.genarm import RewardGuidance
    from workers.generation import Generation
    from workers.runtime import ModelRuntime


@dataclass(frozen=True)
class DecodeParams:
    """What one request asks of the decoder (per choice; ``n`` choices decode independently)."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)  # {}: any JSON object


@dataclass(frozen=True)
class SteeringResources:
    """What a server gives its steering methods: its settings, the lineage DB and a model loader."""

    serve: ServeSettings
    sessions: sessionmaker[Session]
    load_model: Callable[[str], ModelRuntime]


class Decoder:
    """How one request of a method decodes.

    The server's batch engines use the hooks: ``stops`` (the caller's stop strings plus the
    method's), ``finish`` (trims the text; streamed pieces are cut the same way, so streamed and
    plain answers are equal), ``processors`` (per-sequence score processors, e.g. GenARM's
    guidance, run token by token on the HF engine, workers/batch_engine.py) and
    ``reward_guidance`` (the same GenARM guidance as one object, which the vLLM engine's own
    logits processor applies, workers/vllm_batch_engine.py). ``decode`` is the one-call path.
    """

    extra_stops: tuple[str, ...] = ()
    finish: Callable[[str], str] | None = None

    def stops(self, requested: Sequence[str]) -> list[str]:
        stops = [s for s in requested if s]
        return stops + [s for s in self.extra_stops if s not in stops]

    def processors(self, prompt_ids: list[int]) -> list[Callable[..., Any]]:
        return []

    def reward_guidance(self) -> RewardGuidance | None:
        """The GenARM guidance every token of this request gets, for an engine that cannot run
        :meth:`processors` (vLLM); None: the request is not guided."""
        return None

    def decode(self, prompt: str, params: DecodeParams) -> list[Generation]:
        raise NotImplementedError


class SamplingDecoder(Decoder):
    """``runtime.generate`` with the caller's stop strings plus ``extra_stops``; ``finish`` trims finished text."""

    def __init__(self, runtime: ModelRuntime, extra_stops: Sequence[str] = (), finish: Callable[[str], str] | None = None) -> None:
        self.runtime = runtime
        self.extra_stops = tuple(extra_stops)
        self.finish = finish

    def decode(self, prompt: str, params: DecodeParams) -> list[Generation]:
        generations = self.runtime.generate(
            [prompt], num_samples=params.n, max_new_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=params.seed, stop_strings=self.stops(params.stop),
        )[0]
        if self.finish is not None:
            generations = [replace(g, text=self.finish(g.text)) for g in generations]
        return generations


class SteeringMethod:
    """One steering method. Subclasses set ``name`` (its key in policies.steering.METHODS) and
    ``option_keys`` (the request keys it takes besides ``method``), and override what they change."""

    name: ClassVar[str]
    option_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, resources: SteeringResources) -> None:
        self.resources = resources

    def parse(self, raw: Mapping[str, Any]) -> SteeringSpec:
        """Validate the request's steering field (raise policies.steering.SteeringError)."""
        check_keys(raw, self.name, self.option_keys)
        return SteeringSpec(self.name, self.options(raw))

    def options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def render_chat(self, runtime: ModelRuntime, messages: list[dict], spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        """The model's own prompt format (``ModelRuntime.render_chat``), leaving room for ``max_new_tokens``."""
        return runtime.render_chat(messages, max_new_tokens=max_new_tokens)

    def render_completion(self, runtime: ModelRuntime, prompt: str, spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        """/v1/completions continues raw text."""
        return prompt

    def decoder(self, runtime: ModelRuntime, spec: SteeringSpec) -> Decoder:
        """The decoder for this request; raise SteeringError for what can only be checked with the model."""
        return SamplingDecoder(runtime)
