"""The steering methods a server offers, one module each (the registry is policies.steering.METHODS).

``SteeringMethods(resources)`` builds every registered method once, at server start, and turns a
request's ``steering`` field into a validated spec for the method it names.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from policies.steering import DEFAULT_METHOD, METHODS, SteeringSpec, requested_method
from workers.steering.base import DecodeParams, Decoder, SamplingDecoder, SteeringMethod, SteeringResources

__all__ = ["DecodeParams", "Decoder", "SamplingDecoder", "SteeringMethod", "SteeringMethods", "SteeringResources", "method_class"]


def method_class(name: str) -> type[SteeringMethod]:
    """The class registered for ``name`` in policies.steering.METHODS."""
    module_name, _, class_name = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, SteeringMethod)) or cls.name != name:
        raise TypeError(f"steering method {name!r}: {METHODS[name]} is not a SteeringMethod named {name!r}")
    return cls


class SteeringMethods(Mapping[str, SteeringMethod]):
    def __init__(self, resources: SteeringResources, default_method: str = DEFAULT_METHOD) -> None:
        self.default_method = default_method
        self._methods = {name: method_class(name)(resources) for name in METHODS}

    def parse(self, raw: Any) -> SteeringSpec:
        """Validate a request's steering field (raise policies.steering.SteeringError)."""
        name, fields = requested_method(raw, self.default_method)
        return self._methods[name].parse(fields)

    def __getitem__(self, name: str) -> SteeringMethod:
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)
