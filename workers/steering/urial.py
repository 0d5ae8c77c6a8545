"""``urial``: no tuning; a preamble and stylistic ``# Query:`` / ``# Answer:`` examples (policies.urial).

Earlier turns are rendered as examples and decoding stops at the next ``# Query:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies.steering import SteeringSpec
from policies.urial import URIAL_STOP, cut_at_stop, load_urial_preset
from workers.steering.base import Decoder, SamplingDecoder, SteeringMethod, SteeringResources

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime


class UrialSteering(SteeringMethod):
    name = "urial"

    def __init__(self, resources: SteeringResources) -> None:
        super().__init__(resources)
        # Loaded here, at server start: a broken preset file fails start-up, not a request.
        self.preset = load_urial_preset(resources.serve.urial_preset)

    def render_chat(self, runtime: ModelRuntime, messages: list[dict], spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        """The preset's examples, the oldest dropped first while the prompt leaves no room for ``max_new_tokens``."""
        return runtime.render_urial(messages, self.preset, max_new_tokens=max_new_tokens)

    def render_completion(self, runtime: ModelRuntime, prompt: str, spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        """A raw completion prompt is the one user turn."""
        return self.render_chat(runtime, [{"role": "user", "content": prompt}], spec, max_new_tokens=max_new_tokens)

    def decoder(self, runtime: ModelRuntime, spec: SteeringSpec) -> Decoder:
        # A token limit can leave the start of the next "# Query:" line behind: cut_at_stop removes it.
        return SamplingDecoder(runtime, extra_stops=[URIAL_STOP], finish=cut_at_stop)
