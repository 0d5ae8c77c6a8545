"""The one registry of the cycle's stages: what each is called, where it runs, how it is shown.

Torch-free on purpose: the scheduler, the CLI's status views, the dashboard and the metrics
endpoint read stage names and labels without loading the model-holding side. The stage's code is
named by a dotted path and imported only where a stage runs (``stage_function``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from daemon.config import Settings


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str
    short_label: str
    # Generation, judging and training hold a model ("gpu"); bookkeeping runs anywhere ("cpu").
    queue: Literal["gpu", "cpu"]
    # "module:function" of the stage's code, imported where the stage runs.
    function: str
    # An optional stage runs only when this config section says `enabled: true`.
    optional_section: str | None = None


STAGE_SPECS: tuple[StageSpec, ...] = (
    StageSpec("generate_prompts", "prompts", "gen", "gpu", "workers.stages.generate_prompts:generate_prompts"),
    StageSpec("respond", "respond", "respond", "gpu", "workers.stages.respond:respond"),
    StageSpec("judge", "judge", "judge", "gpu", "workers.stages.judge:judge"),
    StageSpec("build_pairs", "pairs", "pairs", "cpu", "workers.stages.build_pairs:build_pairs"),
    StageSpec("steerlm_sft", "SteerLM SFT", "steerlm", "gpu", "workers.stages.steerlm_sft:steerlm_sft", optional_section="steerlm"),
    StageSpec("genarm_train", "GenARM RM", "arm", "gpu", "workers.stages.genarm_train:genarm_train", optional_section="genarm"),
    StageSpec("dpo_update", "DPO", "dpo", "gpu", "workers.stages.dpo_update:dpo_update"),
    StageSpec("evaluate_gate", "gate", "gate", "gpu", "workers.stages.evaluate_gate:evaluate_gate"),
    # Scores a promoted champion (and the initial model) on eval.suites; a no-op otherwise.
    StageSpec("evaluate_suites", "suites", "eval", "gpu", "workers.stages.evaluate_suites:evaluate_suites"),
)

STAGES_BY_NAME: dict[str, StageSpec] = {spec.name: spec for spec in STAGE_SPECS}
STAGE_ORDER: tuple[str, ...] = tuple(spec.name for spec in STAGE_SPECS)
OPTIONAL_STAGES: dict[str, str] = {spec.name: spec.optional_section for spec in STAGE_SPECS if spec.optional_section}
CORE_STAGES: tuple[str, ...] = tuple(name for name in STAGE_ORDER if name not in OPTIONAL_STAGES)
STAGE_QUEUES: dict[str, str] = {spec.name: spec.queue for spec in STAGE_SPECS}
STAGE_LABELS: dict[str, str] = {spec.name: spec.label for spec in STAGE_SPECS}
STAGE_SHORT_LABELS: dict[str, str] = {spec.name: spec.short_label for spec in STAGE_SPECS}


def stages_for(settings: Settings) -> tuple[str, ...]:
    """The stages an iteration started with ``settings`` runs, in order."""
    return tuple(
        spec.name for spec in STAGE_SPECS if spec.optional_section is None or getattr(settings, spec.optional_section).enabled
    )


def stage_index(name: str) -> int:
    return STAGE_ORDER.index(name)


def stage_function(name: str) -> Callable[[Any], Any]:
    """Import and return the code of stage ``name`` (this loads the model-holding side)."""
    module_name, _, attribute = STAGES_BY_NAME[name].function.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
