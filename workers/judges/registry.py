"""Which judges exist and how the configuration picks one.

A backend is one module in this package that registers its class::

    @register_judge("my_judge")
    class MyJudge(Judge): ...

Every module of the package that is not infrastructure (``_INFRASTRUCTURE``) is imported the
first time a judge is built, so the package keeps no list of its modules. The configuration,
which cannot import this side, validates names against ``policies.judges.BACKENDS`` (one line
per built-in backend) plus whatever registered at run time (a plugin, a test's stub). A backend with several modes (the self-judge's
``logprob`` and ``text``) registers one class per mode; ``judge.mode`` chooses among them.

Discovering the backends does not import torch (see ``base``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from policies import judges as judge_names_list
from workers.judges.base import ROLES, Judge, JudgeContext, ModelLoader, Role

if TYPE_CHECKING:
    from daemon.config import Settings

J = TypeVar("J", bound=type[Judge])

_PACKAGE = "workers.judges"
# Modules of the package that hold no backend.
_INFRASTRUCTURE = frozenset({"base", "registry", "composite"})

_registry: dict[str, dict[str | None, type[Judge]]] = {}
_discovered = False


def register_judge(name: str, *, mode: str | None = None) -> Callable[[J], J]:
    """Class decorator: make ``cls`` the judge called ``name`` (in ``mode``, if it has modes)."""

    def decorate(cls: J) -> J:
        modes = _registry.setdefault(name, {})
        existing = modes.get(mode)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"judge {name!r} (mode {mode!r}) is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        modes[mode] = cls
        judge_names_list.allow(name)
        return cls

    return decorate


def unregister_judge(name: str) -> None:
    """Remove a judge (tests that register a stub clean up with this)."""
    _registry.pop(name, None)
    judge_names_list.forget(name)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _INFRASTRUCTURE and not module.name.startswith("_"):
            importlib.import_module(f"{_PACKAGE}.{module.name}")
    _discovered = True


def judge_names() -> list[str]:
    """Every registered judge name, sorted."""
    _discover()
    return sorted(_registry)


def judge_class(name: str, mode: str | None = None) -> type[Judge]:
    """The class registered as ``name``; for a judge with modes, the one for ``mode``."""
    _discover()
    modes = _registry.get(name)
    if not modes:
        raise ValueError(f"unknown judge {name!r}; allowed: {', '.join(judge_names())}")
    if None in modes:
        return modes[None]
    if mode not in modes:
        raise ValueError(f"judge {name!r} has no mode {mode!r}; allowed: {', '.join(sorted(m for m in modes if m))}")
    return modes[mode]


def configured_backends(settings: Settings, role: Role) -> list[str]:
    """The judge names configured for ``role``, in composition order."""
    if role not in ROLES:
        raise ValueError(f"unknown judge role {role!r}; allowed: {', '.join(ROLES)}")
    if role == "gate":
        names = settings.gate.judge
    elif role == "label":
        names = settings.judge.label_backend
    else:
        names = settings.judge.backend
    return [names] if isinstance(names, str) else list(names)


def build_judge(
    settings: Settings,
    role: Role,
    *,
    policy_path: str,
    load_model: ModelLoader,
    initial_path: str | None = None,
    parent_path: str | None = None,
    seed: int = 0,
    backends: Sequence[str] | None = None,
) -> Judge:
    """The judge ``settings`` configure for ``role`` ("train": the judge stage's scores, "gate":
    the gate's pairwise comparisons, "label": SteerLM attribute labels).

    Several backends compose: the first decides where it can, the next orders what it could
    not separate (``workers.judges.composite``). ``backends`` overrides the configured names.
    """
    context = JudgeContext(
        settings=settings, role=role, policy_path=policy_path, load_model=load_model,
        initial_path=initial_path, parent_path=parent_path, seed=seed,
    )
    names = list(backends) if backends is not None else configured_backends(settings, role)
    if not names:
        raise ValueError(f"no judge configured for role {role!r}")
    judges = [judge_class(name, settings.judge.mode)(context) for name in names]
    if len(judges) == 1:
        return judges[0]
    from workers.judges.composite import CompositeJudge

    return CompositeJudge(context, judges)


__all__ = [
    "JudgeContext",
    "build_judge",
    "configured_backends",
    "judge_class",
    "judge_names",
    "register_judge",
    "unregister_judge",
]
