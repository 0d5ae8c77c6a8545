from __future__ import annotations

from pathlib import Path

from daemon.config import Settings, load_settings


def small_cycle_config(data_dir: Path, model_path: Path, **overrides) -> dict:
    """A cycle small enough to run in seconds on 2 CPU cores, as a plain (YAML-ready) dict."""
    config = {
        "data_dir": str(data_dir),
        "model": {"path": str(model_path)},
        "worker": {"mode": "eager"},
        "generation": {"max_new_tokens": 12, "batch_size": 32},
        "prompts": {"per_cycle": 3, "max_rounds": 1},
        "respond": {"num_samples": 2},
        "judge": {"num_samples": 1, "max_new_tokens": 12},
        "training": {"max_steps": 2, "batch_size": 2, "max_length": 128},
        "gate": {"heldout_prompts": 4, "min_comparisons": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def small_cycle_settings(data_dir: Path, model_path: Path, **overrides) -> Settings:
    return load_settings(None, **small_cycle_config(data_dir, model_path, **overrides))
