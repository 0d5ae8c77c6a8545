"""The judge backends' names, for the configuration to validate against without loading them.

Each backend is one module in ``workers/judges/`` that registers its class with
``register_judge(name)``. The configuration (``judge.backend``, ``judge.label_backend``,
``gate.judge``) sits below the model-holding side and cannot import it, so the built-in names are
listed here once (a test checks that the list and the registered backends agree). A judge
registered at run time (a plugin, a test's stub) is allowed as soon as it registers.
"""

from __future__ import annotations

from collections.abc import Sequence

BACKENDS: tuple[str, ...] = ("self", "frozen", "openai", "implicit", "verifier")

_registered_at_run_time: set[str] = set()


def allow(name: str) -> None:
    """Accept ``name`` in the configuration (called by ``register_judge``)."""
    if name not in BACKENDS:
        _registered_at_run_time.add(name)


def forget(name: str) -> None:
    _registered_at_run_time.discard(name)


def allowed() -> list[str]:
    return sorted({*BACKENDS, *_registered_at_run_time})


def unknown(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are no judge."""
    known = set(allowed())
    return [name for name in names if name not in known]
