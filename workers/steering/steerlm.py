"""``steerlm``: the requested attribute values put into the conversation the way the
``steerlm_sft`` stage trained the model on them (policies.steerlm)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from policies.steering import SteeringSpec, parse_attributes
from policies.steerlm import steerlm_messages
from workers.steering.base import SteeringMethod

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime


class SteerLMSteering(SteeringMethod):
    name = "steerlm"
    option_keys = frozenset({"attributes"})

    def options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"attributes": parse_attributes(raw.get("attributes", {}))}

    def render_chat(self, runtime: ModelRuntime, messages: list[dict], spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        return runtime.render_chat(steerlm_messages(messages, spec.options["attributes"]), max_new_tokens=max_new_tokens)

    def render_completion(self, runtime: ModelRuntime, prompt: str, spec: SteeringSpec, *, max_new_tokens: int | None = None) -> str:
        """A raw completion prompt is the one user turn."""
        return self.render_chat(runtime, [{"role": "user", "content": prompt}], spec, max_new_tokens=max_new_tokens)
