"""The per-request ``steering`` field of the serving API, parsed and validated.

Request body (OpenAI-compatible, plus one extra field)::

    "steering": {"method": "none" | "urial" | "steerlm" | "genarm",
                 "attributes": {"helpfulness": 4, "humor": 0},          # steerlm only
                 "reward_models": {"loop": 1.0, "concise": 0.5},        # genarm only: name -> weight
                 "beta": 1.0}                                           # genarm only

A missing field means the deployment's default method. Every error names the bad key and the
allowed values, so the server can answer 400 with a message the caller can act on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

METHOD_NONE = "none"
METHOD_URIAL = "urial"
METHOD_STEERLM = "steerlm"
METHOD_GENARM = "genarm"
METHODS = (METHOD_NONE, METHOD_URIAL, METHOD_STEERLM, METHOD_GENARM)

_KEYS_BY_METHOD = {
    METHOD_NONE: {"method"},
    METHOD_URIAL: {"method"},
    METHOD_STEERLM: {"method", "attributes"},
    METHOD_GENARM: {"method", "reward_models", "beta"},
}


class SteeringError(ValueError):
    """A steering request the server cannot honour; the message says what is allowed."""


@dataclass(frozen=True)
class SteeringSpec:
    method: str
    attributes: dict[str, int] = field(default_factory=dict)
    reward_weights: tuple[tuple[str, float], ...] = ()
    beta: float = 1.0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method == METHOD_STEERLM:
            out["attributes"] = dict(self.attributes)
        if self.method == METHOD_GENARM:
            out["reward_models"] = dict(self.reward_weights)
            out["beta"] = self.beta
        return out


def parse_steering(
    raw: Mapping[str, Any] | None,
    *,
    default_method: str = METHOD_NONE,
    reward_models: Mapping[str, float] | None = None,
    default_beta: float = 1.0,
) -> SteeringSpec:
    """Validate a request's steering field; ``reward_models`` maps available names to default weights."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SteeringError("steering must be an object, e.g. {\"method\": \"urial\"}")
    method = raw.get("method", default_method)
    if method not in METHODS:
        raise SteeringError(f"steering.method {method!r} is not one of {list(METHODS)}")
    unknown = sorted(set(raw) - _KEYS_BY_METHOD[method])
    if unknown:
        raise SteeringError(f"steering key(s) {unknown} do not apply to method {method!r}; allowed: {sorted(_KEYS_BY_METHOD[method])}")
    if method == METHOD_STEERLM:
        return SteeringSpec(method, attributes=_attributes(raw.get("attributes", {})))
    if method == METHOD_GENARM:
        weights = _reward_weights(raw.get("reward_models"), reward_models or {})
        return SteeringSpec(method, reward_weights=weights, beta=_beta(raw.get("beta", default_beta)))
    return SteeringSpec(method)


def _attributes(values: Any) -> dict[str, int]:
    from policies.steerlm import SteeringAttributeError, validate_attributes

    if not isinstance(values, Mapping):
        raise SteeringError("steering.attributes must be an object of attribute name -> integer value")
    try:
        return validate_attributes(values)
    except SteeringAttributeError as exc:
        raise SteeringError(f"steering.attributes: {exc}") from None


def _reward_weights(requested: Any, available: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    if not available:
        raise SteeringError(
            "steering.method 'genarm' needs a reward model and none is available yet: enable the loop's "
            "genarm_train stage (genarm.enabled) or configure serve.genarm.reward_models with a path"
        )
    if requested is None:
        return tuple(sorted(available.items()))
    if not isinstance(requested, Mapping) or not requested:
        raise SteeringError(f"steering.reward_models must be a non-empty object of name -> weight; available: {sorted(available)}")
    weights = []
    for name, weight in requested.items():
        if name not in available:
            raise SteeringError(f"steering.reward_models: unknown reward model {name!r}; available: {sorted(available)}")
        value = _finite_number(weight, f"steering.reward_models.{name}")
        if value < 0:
            # -w·log p_arm rewards what the reward model finds implausible, not the opposite preference.
            raise SteeringError(f"steering.reward_models.{name} must be >= 0, got {value}; to steer away from a preference, use a reward model trained on the swapped pairs")
        weights.append((name, value))
    return tuple(sorted(weights))


def _beta(value: Any) -> float:
    beta = _finite_number(value, "steering.beta")
    if beta <= 0:
        raise SteeringError(f"steering.beta must be > 0 (it divides the reward log-probs), got {beta}")
    return beta


def _finite_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteeringError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def stop_strings_for(method: str, requested: Sequence[str]) -> list[str]:
    """The stop strings a request decodes with: the caller's, plus URIAL's query marker."""
    stops = [s for s in requested if s]
    if method == METHOD_URIAL:
        from policies.urial import URIAL_STOP

        if URIAL_STOP not in stops:
            stops.append(URIAL_STOP)
    return stops
