"""The optional stages (SteerLM SFT, GenARM reward model); their code lives in workers.steerlm and workers.genarm."""

from __future__ import annotations

from workers.stage_runner import StageContext, StageOutput
from workers.stages.common import stage_seed


def steerlm_sft(ctx: StageContext) -> StageOutput:
    from workers.steerlm import SteerLMSettings, steerlm_sft as run

    # The labelling settings (judge_samples, judge_max_new_tokens) are read by the label judge itself.
    section = ctx.settings.steerlm.model_dump(exclude={"enabled", "judge_samples", "judge_max_new_tokens"})
    return run(ctx, SteerLMSettings(**section))


def genarm_train(ctx: StageContext) -> StageOutput:
    from workers.genarm import ArmTrainSettings, genarm_train as run

    section = ctx.settings.genarm.model_dump(exclude={"enabled", "base_model_path"})
    return run(ctx, settings=ArmTrainSettings(**section, seed=stage_seed(ctx, "genarm_train")), reward_base_path=ctx.settings.genarm.base_model_path)

