"""``genarm``: reward-guided decoding, ``log p(y_t) ∝ log p_base(y_t) + (1/β)·Σ_i w_i·log p_arm_i(y_t)``.

``serve.genarm.reward_models`` maps names to paths and default weights. A name without a path
means "the newest reward model the loop trained" (the ``genarm_train`` stage's checkpoint in the
lineage DB), so a deployment follows the loop without editing its config. Reward models are
loaded on first use and kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import StageRun, StageStatus
from policies.steering import SteeringError, SteeringSpec, parse_beta, parse_reward_weights
from workers.steering.base import DecodeParams, Decoder, SteeringMethod, SteeringResources

if TYPE_CHECKING:
    from daemon.config import Settings
    from workers.genarm import RewardGuidance
    from workers.generation import Generation
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


def check_configured_reward_models(settings: Settings, champion_path: str | None) -> None:
    """Every ``serve.genarm.reward_models.<name>.path`` passes the model checks and shares the
    champion's tokenizer, at ``kaizen serve`` start rather than at a request (ModelCheckError)."""
    from workers.artifacts import model_path_for_loading
    from workers.model_checks import check_model, check_tokenizers_match

    for name, reward_model in settings.serve.genarm.reward_models.items():
        if not reward_model.path:
            continue
        key = f"serve.genarm.reward_models.{name}.path"
        check_model(reward_model.path, key=key, device=settings.model.runtime_options()["device"])
        if champion_path is not None:
            check_tokenizers_match(model_path_for_loading(settings, champion_path), reward_model.path, key=key)


class GuidedDecoder(Decoder):
    """One guided completion per sample (seeds ``seed``, ``seed + 1``, ...). In the server each
    sequence gets its own guidance (reward-model KV caches: a processor per sequence on the HF
    engine, the engine's GenArmLogitsProcessor on vLLM), so it streams token by token."""

    def __init__(self, runtime: ModelRuntime, guides: list[tuple[ModelRuntime, float]], beta: float) -> None:
        self.runtime, self.guides, self.beta = runtime, guides, beta

    def processors(self, prompt_ids: list[int]) -> list[Any]:
        guidance = self.reward_guidance()
        if guidance is None:
            return []
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long)
        return guidance(ids, torch.ones_like(ids))

    def reward_guidance(self) -> RewardGuidance | None:
        active = [(guide, weight) for guide, weight in self.guides if weight > 0]  # weight 0: the base alone
        if not active:
            return None
        from workers.genarm import RewardGuidance

        return RewardGuidance(tuple(g.model for g, _ in active), tuple(w for _, w in active), self.beta)

    def decode(self, prompt: str, params: DecodeParams) -> list[Generation]:
        from workers.genarm import guided_generate

        seed = params.seed if params.seed is not None else 0
        return [
            guided_generate(
                self.runtime, self.guides, [prompt], beta=self.beta, max_new_tokens=params.max_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=seed + i, stop=params.stop,
            )[0]
            for i in range(params.n)
        ]


class GenArmSteering(SteeringMethod):
    name = "genarm"
    option_keys = frozenset({"reward_models", "beta"})

    def __init__(self, resources: SteeringResources) -> None:
        super().__init__(resources)
        self.settings = resources.serve.genarm
        self._loaded: dict[str, ModelRuntime] = {}
        self._lock = threading.Lock()

    def options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "reward_models": parse_reward_weights(raw.get("reward_models"), self.available()),
            "beta": parse_beta(raw.get("beta", self.settings.beta)),
        }

    def available(self) -> dict[str, float]:
        """Names a request may use now, with their default weights."""
        return {name: rm.weight for name, rm in self.settings.reward_models.items() if self._path(name)}

    def decoder(self, runtime: ModelRuntime, spec: SteeringSpec) -> Decoder:
        return GuidedDecoder(runtime, self.guides(spec.options["reward_models"], runtime), spec.options["beta"])

    def guides(self, weights: Mapping[str, float], base: ModelRuntime) -> list[tuple[ModelRuntime, float]]:
        from workers.genarm import TokenizerMismatchError, check_shared_tokenizer

        guides = []
        for name, weight in weights.items():
            path = self._path(name)
            if path is None:
                raise SteeringError(f"reward model {name!r} has not been trained yet", param="steering.reward_models")
            reward = self._runtime(path)
            try:
                check_shared_tokenizer(base.tokenizer, reward.tokenizer, base_name=base.model_path, reward_name=path)
            except TokenizerMismatchError as exc:
                raise SteeringError(str(exc), param="steering.reward_models") from None
            guides.append((reward, weight))
        return guides

    def _path(self, name: str) -> str | None:
        configured = self.settings.reward_models[name].path
        if configured:
            return configured
        with self.resources.sessions() as session:
            return latest_loop_reward_model(session)

    def _runtime(self, path: str) -> ModelRuntime:
        with self._lock:
            if path not in self._loaded:
                self._loaded[path] = self.resources.load_model(path)
            return self._loaded[path]
