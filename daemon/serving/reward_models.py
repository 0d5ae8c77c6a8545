"""The GenARM reward models a request may name, loaded on first use and kept.

``serve.genarm.reward_models`` maps names to paths and default weights. A name without a path
means "the newest reward model the loop trained" (the ``genarm_train`` stage's checkpoint in the
lineage DB), so a deployment follows the loop without editing its config.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import GenArmServeSettings
from daemon.db.models import StageRun, StageStatus
from policies.steering import SteeringError
from workers.runtime import ModelRuntime

ARM_STAGE = "genarm_train"


def latest_loop_reward_model(session: Session) -> str | None:
    # A skipped run (too few pairs) succeeded without a model; an older trained one still stands.
    rows = session.scalars(
        select(StageRun)
        .where(StageRun.stage == ARM_STAGE, StageRun.status == StageStatus.succeeded)
        .order_by(StageRun.iteration_id.desc())
    )
    return next((row.result["path"] for row in rows if row.result.get("path")), None)


class RewardModels:
    def __init__(self, settings: GenArmServeSettings, sessions: sessionmaker[Session], loader: Callable[[str], ModelRuntime]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.loader = loader
        self._loaded: dict[str, ModelRuntime] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> str | None:
        configured = self.settings.reward_models[name].path
        if configured:
            return configured
        with self.sessions() as session:
            return latest_loop_reward_model(session)

    def available(self) -> dict[str, float]:
        """Names a request may use now, with their default weights."""
        return {name: rm.weight for name, rm in self.settings.reward_models.items() if self._path(name)}

    def guides(self, weights: tuple[tuple[str, float], ...], base: ModelRuntime) -> list[tuple[ModelRuntime, float]]:
        from workers.genarm import check_shared_tokenizer

        guides = []
        for name, weight in weights:
            path = self._path(name)
            if path is None:
                raise SteeringError(f"reward model {name!r} has not been trained yet")
            runtime = self._runtime(path)
            check_shared_tokenizer(base.tokenizer, runtime.tokenizer, base_name=base.model_path, reward_name=path)
            guides.append((runtime, weight))
        return guides

    def _runtime(self, path: str) -> ModelRuntime:
        with self._lock:
            if path not in self._loaded:
                self._loaded[path] = self.loader(path)
            return self._loaded[path]
