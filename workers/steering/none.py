"""``none``: the model's own chat template and plain sampling (the base class's defaults)."""

from __future__ import annotations

from workers.steering.base import SteeringMethod


class NoSteering(SteeringMethod):
    name = "none"
