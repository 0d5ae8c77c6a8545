"""A fixed judge model: the self-judge's prompts and readings (``judge.mode``), asked of a model
that does not change as the policy trains.

``judge.frozen.path`` is ``initial`` (the lineage's first model) or any model path the runtime
loads (a Hugging Face directory or hub id, a ``.gguf`` file). The model is loaded once per
worker process and kept: the runtime cache holds only the two most recent models, and the gate
already loads the champion and the candidate, so a frozen judge would otherwise be reloaded for
every comparison batch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from policies import rubric
from workers.judges.base import JudgeUnavailable
from workers.judges.registry import register_judge
from workers.judges.self_logprob import SelfLogprobJudge
from workers.judges.self_text import ModelJudge, SelfTextJudge

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime

INITIAL = "initial"

_pinned: dict[str, ModelRuntime] = {}
_pinned_lock = threading.Lock()


def pinned_paths() -> list[str]:
    """The frozen judge models this process holds."""
    with _pinned_lock:
        return list(_pinned)


class FrozenModel(ModelJudge):
    def model_path(self) -> str:
        configured = self.context.settings.judge.frozen.path
        if configured != INITIAL:
            return configured
        if self.context.initial_path is None:
            raise JudgeUnavailable("judge.frozen.path is 'initial' but the lineage's initial checkpoint is unknown here")
        return self.context.initial_path

    def runtime(self) -> ModelRuntime:
        path = self.model_path()
        with _pinned_lock:
            runtime = _pinned.get(path)
            if runtime is None:
                runtime = _pinned[path] = self.context.load_model(path)
            return runtime


@register_judge("frozen", mode=rubric.JUDGE_MODE_LOGPROB)
class FrozenLogprobJudge(FrozenModel, SelfLogprobJudge):
    """Recorded as "frozen:logprob"."""


@register_judge("frozen", mode=rubric.JUDGE_MODE_TEXT)
class FrozenTextJudge(FrozenModel, SelfTextJudge):
    """Recorded as "frozen:text"."""
