"""The per-request ``steering`` field of the serving API: the method registry and pure validation.

Request body (OpenAI-compatible, plus one extra field)::

    "steering": {"method": "none" | "urial" | "steerlm" | "genarm",
                 "attributes": {"helpfulness": 4, "humor": 0},          # steerlm only
                 "reward_models": {"loop": 1.0, "concise": 0.5},        # genarm only: name -> weight
                 "beta": 1.0}                                           # genarm only

A missing field means the deployment's default method. Every error names the bad key and the
allowed values, so the server can answer 400 with a message the caller can act on.

Each method is one module (``workers/steering/<name>.py``) that renders the prompt and decodes;
:data:`METHODS` is the one list of their names (the config's ``serve.default_steering`` allows
exactly these). A new method is a new module there plus one line here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# name -> "module:Class" of the method, imported only by the model-holding side.
METHODS: dict[str, str] = {
    "none": "workers.steering.none:NoSteering",
    "urial": "workers.steering.urial:UrialSteering",
    "steerlm": "workers.steering.steerlm:SteerLMSteering",
    "genarm": "workers.steering.genarm:GenArmSteering",
}
DEFAULT_METHOD = "none"


class SteeringError(ValueError):
    """A steering request the server cannot honour; the message says what is allowed.

    ``param`` names the request field at fault, for the API's error body.
    """

    def __init__(self, message: str, *, param: str = "steering") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SteeringSpec:
    """A validated steering request: the method and its method-specific options."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the response reports back (the ``kaizen.steering`` object)."""
        return {"method": self.method, **self.options}


def requested_method(raw: Any, default_method: str) -> tuple[str, Mapping[str, Any]]:
    """The method a request's steering field names (or the default), and the field as a mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SteeringError("steering must be an object, e.g. {\"method\": \"urial\"}")
    method = raw.get("method", default_method)
    if method not in METHODS:
        raise SteeringError(f"steering.method {method!r} is not one of {list(METHODS)}")
    return method, raw


def check_keys(raw: Mapping[str, Any], method: str, option_keys: frozenset[str]) -> None:
    allowed = {"method", *option_keys}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SteeringError(f"steering key(s) {unknown} do not apply to method {method!r}; allowed: {sorted(allowed)}")


def parse_attributes(values: Any) -> dict[str, int]:
    """SteerLM's requested attribute values, completed with defaults (policies.steerlm)."""
    from policies.steerlm import SteeringAttributeError, validate_attributes

    if not isinstance(values, Mapping):
        raise SteeringError("steering.attributes must be an object of attribute name -> integer value")
    try:
        return validate_attributes(values)
    except SteeringAttributeError as exc:
        raise SteeringError(f"steering.attributes: {exc}") from None


def parse_reward_weights(requested: Any, available: Mapping[str, float]) -> dict[str, float]:
    """GenARM's reward-model weights: the requested ones, or every available model's default."""
    if not available:
        raise SteeringError(
            "steering.method 'genarm' needs a reward model and none is available yet: enable the loop's "
            "genarm_train stage (genarm.enabled) or configure serve.genarm.reward_models with a path"
        )
    if requested is None:
        return dict(sorted(available.items()))
    if not isinstance(requested, Mapping) or not requested:
        raise SteeringError(f"steering.reward_models must be a non-empty object of name -> weight; available: {sorted(available)}")
    weights = {}
    for name, weight in requested.items():
        if name not in available:
            raise SteeringError(f"steering.reward_models: unknown reward model {name!r}; available: {sorted(available)}")
        value = finite_number(weight, f"steering.reward_models.{name}")
        if value < 0:
            # -w·log p_arm rewards what the reward model finds implausible, not the opposite preference.
            raise SteeringError(f"steering.reward_models.{name} must be >= 0, got {value}; to steer away from a preference, use a reward model trained on the swapped pairs")
        weights[name] = value
    return dict(sorted(weights.items()))


def parse_beta(value: Any) -> float:
    beta = finite_number(value, "steering.beta")
    if beta <= 0:
        raise SteeringError(f"steering.beta must be > 0 (it divides the reward log-probs), got {beta}")
    return beta


def finite_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteeringError(f"{key} must be a finite number, got {value!r}")
    return float(value)

