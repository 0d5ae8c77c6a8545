"""model.engine picks what respond and the judges sample and score with: hf unless set, vllm a
machine's own choice, and a clear error where vllm is chosen but not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings
from tests.factories import small_cycle_settings
from workers.loading import load_runtime, load_sampler

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_the_hf_engine_is_the_default_and_samples_with_the_training_runtime(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir)

    assert settings.model.engine == "hf"
    assert load_sampler(settings, str(tiny_model_dir)) is load_runtime(settings, str(tiny_model_dir))


def test_model_engine_accepts_hf_or_vllm_only(tmp_path: Path) -> None:
    assert load_settings(None, data_dir=str(tmp_path), model={"engine": "vllm"}).model.engine == "vllm"
    with pytest.raises(ConfigError, match="model.engine"):
        load_settings(None, data_dir=str(tmp_path), model={"engine": "sglang"})


def test_the_engine_is_this_machines_not_the_recorded_iterations(tmp_path: Path) -> None:
    recorded = load_settings(None, data_dir=str(tmp_path / "gpu"), model={"engine": "vllm", "vllm_kv_cache_gib": 20}).snapshot()
    local = load_settings(None, data_dir=str(tmp_path / "cpu"))

    used = local.for_iteration(recorded)

    assert (used.model.engine, used.model.vllm_kv_cache_gib) == ("hf", None)


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here: tests/workers/test_vllm_engine.py runs the engine")
def test_choosing_vllm_without_it_installed_says_how_to_install_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.vllm_engine import VllmUnavailable

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, model={"engine": "vllm"})

    with pytest.raises(VllmUnavailable, match="ops/install_vllm.sh"):
        load_sampler(settings, str(tiny_model_dir))
