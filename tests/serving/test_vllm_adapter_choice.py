"""What VllmChampionLoader does with each promotion, on a stand-in engine (no vLLM needed): a
candidate of the engine's model hot-loads its own adapter, a candidate of a candidate its lineage
adapter, and the checkpoint past model.vllm_max_stacked_adapters restarts the engine, after which
its descendants hot-load again. tests/serving/test_vllm_serving.py runs promotions on real vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.serving.champion import VllmChampionLoader, adapter_on_engine, stacked_lora_rank
from tests.factories import lora_candidate
from workers import vllm_engine
from workers.lora_training import ADAPTER_SUBDIR, LINEAGE_ADAPTER_SUBDIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StandInEngine:
    """A running VllmRuntime as the loader uses it: its model, its max_lora_rank, adapter views."""

    def __init__(self, model_path: str, max_lora_rank: int) -> None:
        self.model_path = model_path
        self.llm = object()
        self.engine_options = {"max_lora_rank": max_lora_rank}

    def with_adapter(self, adapter: vllm_engine.LoraAdapter) -> StandInView:
        return StandInView(self, adapter)


class StandInView:
    def __init__(self, owner: StandInEngine, adapter: vllm_engine.LoraAdapter) -> None:
        self.owner, self.adapter, self.loaded = owner, adapter, False

    def load_adapter(self) -> None:
        self.loaded = True


@pytest.fixture()
def engine_starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every engine the loader starts: (model path, the max_lora_rank asked for)."""
    starts: list[tuple[str, int]] = []

    def start(model_path: str, **options: Any) -> StandInEngine:
        starts.append((model_path, options["max_lora_rank"]))
        return StandInEngine(model_path, vllm_engine.engine_lora_rank(options["max_lora_rank"]))

    monkeypatch.setattr(vllm_engine.VllmRuntime, "load", start)
    return starts


def test_promotions_hot_load_own_then_lineage_adapters_and_restart_past_the_limit(
    tiny_model_dir: Path, tmp_path: Path, engine_starts: list[tuple[str, int]],
) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), model={"path": str(tiny_model_dir), "engine": "vllm", "vllm_max_stacked_adapters": 2})
    chain: list[Path] = []
    for seed in range(1, 6):  # c1 .. c5, each a candidate of the one before
        chain.append(lora_candidate(chain[-1] if chain else tiny_model_dir, tmp_path / f"c{seed}", seed=seed, max_stacked_adapters=2))
    c1, c2, c3, c4, c5 = chain
    loader = VllmChampionLoader(settings)
    assert loader.max_lora_rank == 16  # two adapters of the trainers' lora_r 8

    engine = loader(str(tiny_model_dir))
    assert engine_starts == [(str(tiny_model_dir), 16)]

    def served_adapter(checkpoint: Path) -> Path:
        view = loader(str(checkpoint))
        assert isinstance(view, StandInView) and view.loaded and view.owner is loader.base
        return Path(view.adapter.path)

    assert served_adapter(c1) == (c1 / ADAPTER_SUBDIR).resolve()  # trained on the engine's model
    assert served_adapter(c2) == (c2 / LINEAGE_ADAPTER_SUBDIR).resolve()  # stacked onto it
    assert loader.base is engine and len(engine_starts) == 1
    assert loader(str(tiny_model_dir)) is engine  # a rollback to the engine's model

    restarted = loader(str(c3))  # past the limit: the merged weights, on an engine of their own
    assert isinstance(restarted, StandInEngine) and engine_starts[-1] == (str(c3), 16) and loader.base is restarted
    assert served_adapter(c4) == (c4 / ADAPTER_SUBDIR).resolve()
    assert served_adapter(c5) == (c5 / LINEAGE_ADAPTER_SUBDIR).resolve()  # the new lineage, rooted at c3
    assert len(engine_starts) == 2

    assert isinstance(loader(str(c1)), StandInEngine)  # a champion from before the engine's model restarts
    assert engine_starts[-1][0] == str(c1)


def test_an_adapter_is_chosen_only_when_it_applies_to_the_engine_model_and_fits_its_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    c1 = lora_candidate(tiny_model_dir, tmp_path / "c1", seed=1, max_stacked_adapters=2)
    c2 = lora_candidate(c1, tmp_path / "c2", seed=2, max_stacked_adapters=2)
    assert adapter_on_engine(str(c2), str(c1), 8).path == c2 / ADAPTER_SUBDIR  # its own first, when it applies
    assert adapter_on_engine(str(c2), str(tiny_model_dir), 16).path == c2 / LINEAGE_ADAPTER_SUBDIR
    assert adapter_on_engine(str(c2), str(tiny_model_dir), 8) is None  # rank 16 does not fit: a restart
    assert adapter_on_engine(str(c2), str(tmp_path / "elsewhere"), 512) is None
    assert adapter_on_engine(str(c1), str(tiny_model_dir), 8).path == c1 / ADAPTER_SUBDIR


def test_the_engines_lora_rank_makes_room_for_the_stacked_adapters(tmp_path: Path) -> None:
    def rank(**sections: Any) -> int:
        return stacked_lora_rank(load_settings(None, data_dir=str(tmp_path), **sections))

    assert rank() == 32  # four adapters of rank 8 by default
    assert rank(model={"vllm_max_stacked_adapters": 1}, steerlm={"lora_r": 16}) == 16  # the larger trainer's rank
    assert rank(model={"vllm_max_stacked_adapters": 64}, training={"lora_r": 64}) == vllm_engine.LORA_RANKS[-1]  # vLLM's largest
