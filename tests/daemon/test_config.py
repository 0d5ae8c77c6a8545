from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import MASK, ConfigError, load_settings


def test_defaults_give_the_embedded_mode(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_broker_url.startswith("kaizen-sqlite+sqlite:///")
    assert settings.model.path == "smollm2"
    assert settings.worker.mode == "local"


def test_file_and_environment_are_merged_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("respond:\n  num_samples: 6\npairs:\n  strategy: rlcd\n")
    monkeypatch.setenv("KAIZEN_RESPOND__NUM_SAMPLES", "3")
    settings = load_settings(config)
    assert settings.respond.num_samples == 3
    assert settings.pairs.strategy == "rlcd"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("pairs:\n  strategy: best\n", "pairs.strategy: unknown pair strategy 'best'; allowed: 'verified', 'repaired', 'anchored', 'ended', 'self_reward', 'rlcd', 'both', or several joined by '+'"),
        ("respond:\n  num_sample: 4\n", "respond.num_sample: unknown key"),
        ("judge:\n  num_samples: 0\n", "judge.num_samples: Input should be greater than or equal to 1"),
        ("schedule:\n  cron: 'every day'\n", "schedule: invalid crontab"),
        ("eval:\n  suites: [instruct-checks, mmlu]\n", "eval.suites: unknown suite 'mmlu', allowed values: 'instruct-checks', 'gate-checks', 'jsonl', 'pairwise-vs-initial'"),
        ("eval:\n  suites: [jsonl]\n", "eval: the jsonl suite needs eval.jsonl_path"),
        ("respond: [1, 2\n", "invalid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("gate:\n  z: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "status", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"kaizen: invalid configuration in {config}: gate.z: Input should be greater than 0"]
    assert "Traceback" not in proc.stderr


def test_an_iteration_computes_with_its_recorded_config_and_only_machine_local_keys_of_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = load_settings(
        None, data_dir=str(tmp_path / "daemon-data"), seed=7, training={"beta": 0.3, "max_steps": 5},
        respond={"num_samples": 3}, model={"device": "cuda", "cpu_threads": 4}, worker={"lease_seconds": 30},
    ).snapshot()
    # This machine's own file and environment disagree on training values and set its local keys.
    monkeypatch.setenv("KAIZEN_TRAINING__BETA", "0.9")
    monkeypatch.setenv("KAIZEN_MODEL__CPU_THREADS", "2")
    local = load_settings(
        None, data_dir=str(tmp_path / "worker-data"), database_url="sqlite:////elsewhere/lineage.db",
        training={"max_steps": 1}, respond={"num_samples": 2}, model={"device": "cpu"},
        worker={"lease_seconds": 90}, serve={"api_key": "worker-secret"},
    )

    used = local.for_iteration(recorded)

    assert (used.seed, used.training.beta, used.training.max_steps, used.respond.num_samples) == (7, 0.3, 5, 3)
    assert used.resolved_data_dir == (tmp_path / "worker-data").resolve()
    assert used.database_url == "sqlite:////elsewhere/lineage.db"
    assert (used.model.device, used.model.cpu_threads, used.worker.lease_seconds) == ("cpu", 2, 90)
    secret = used.serve.api_key
    assert (secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret) == "worker-secret"


def test_a_recorded_config_that_no_longer_validates_is_a_one_line_error(tmp_path: Path) -> None:
    local = load_settings(None, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"the iteration's recorded config: training.bogus: unknown key") as caught:
        local.for_iteration({**local.snapshot(), "training": {"bogus": 1}})
    assert "\n" not in str(caught.value)


def test_an_iteration_without_a_recorded_config_uses_this_machines(tmp_path: Path) -> None:
    local = load_settings(None, data_dir=str(tmp_path), training={"beta": 0.2})
    assert local.for_iteration({}) is local


# Settings whose allowed values are a tuple in policies/: the config's Literal is built from it.
POLICY_LISTED_SETTINGS = [
    ("judge", "mode", "policies.rubric", "JUDGE_MODES"),
    ("model", "prompt_format", "policies.prompt_format", "PROMPT_FORMATS"),
]


@pytest.mark.parametrize(("section", "key", "module", "name"), POLICY_LISTED_SETTINGS)
def test_a_policy_listed_setting_accepts_each_listed_value_and_names_them_all_when_wrong(
    tmp_path: Path, section: str, key: str, module: str, name: str
) -> None:
    allowed = getattr(importlib.import_module(module), name)
    config = tmp_path / "k.yaml"
    for value in allowed:
        config.write_text(f"{section}:\n  {key}: {value}\n")
        assert getattr(getattr(load_settings(config), section), key) == value
    config.write_text(f"{section}:\n  {key}: no-such-value\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{section}.{key}: got 'no-such-value'" in str(caught.value)
    assert all(repr(value) in str(caught.value) for value in allowed)


@pytest.mark.parametrize(("section", "key", "module", "name"), POLICY_LISTED_SETTINGS)
def test_a_value_added_to_the_policy_list_alone_is_accepted_by_the_config(section: str, key: str, module: str, name: str) -> None:
    # A fresh interpreter extends the tuple before the config is imported: that one edit is all
    # a new mode or format needs for the config to accept it.
    program = (
        f"import {module} as listed\n"
        f"listed.{name} = (*listed.{name}, 'added-value')\n"
        "from daemon.config import load_settings\n"
        f"print(load_settings(None, {section}={{{key!r}: 'added-value'}}).{section}.{key})\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "added-value"


JUDGE_URL = "http://judge:s3cret-pw@judge.internal:8000/v1"


def test_the_judge_base_url_is_recorded_without_its_password(tmp_path: Path) -> None:
    snapshot = load_settings(None, data_dir=str(tmp_path), judge={"openai": {"base_url": JUDGE_URL, "model": "big-judge"}}).snapshot()
    assert "s3cret-pw" not in json.dumps(snapshot)
    assert snapshot["judge"]["openai"] == {**snapshot["judge"]["openai"], "base_url": f"http://judge:{MASK}@judge.internal:8000/v1", "model": "big-judge"}


def test_a_worker_reaches_the_judge_at_its_own_base_url_and_asks_the_recorded_judge_model(tmp_path: Path) -> None:
    recorded = load_settings(None, data_dir=str(tmp_path), judge={"openai": {"base_url": JUDGE_URL, "model": "big-judge"}}).snapshot()
    local = load_settings(None, data_dir=str(tmp_path), judge={"openai": {"base_url": "http://127.0.0.1:9999/v1", "model": "other"}})
    used = local.for_iteration(recorded).judge.openai
    assert (used.base_url, used.model) == ("http://127.0.0.1:9999/v1", "big-judge")


def test_a_child_started_from_the_masked_snapshot_gets_the_judge_credentials_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What LocalWorker does: the config file is the snapshot, the secrets travel in KAIZEN_* variables.
    parent = load_settings(None, data_dir=str(tmp_path), judge={"openai": {"base_url": JUDGE_URL}})
    config = tmp_path / "worker-config.yaml"
    config.write_text(yaml.safe_dump(parent.snapshot()))
    for name, value in parent.secret_env().items():
        monkeypatch.setenv(name, value)
    child = load_settings(config)
    assert child.for_iteration(parent.snapshot()).judge.openai.base_url == JUDGE_URL


def test_constraints_per_prompt_takes_a_count_or_a_list_of_counts() -> None:
    assert load_settings(prompts={"constraints_per_prompt": [1, 2]}).prompts.constraints_per_prompt == [1, 2]
    assert load_settings(prompts={"constraints_per_prompt": 2}).prompts.constraints_per_prompt == 2
    for bad in ([], [1, 4], 5):
        with pytest.raises(ConfigError, match=r"prompts\.constraints_per_prompt"):
            load_settings(prompts={"constraints_per_prompt": bad})


def test_the_improvement_demo_config_loads() -> None:
    demo = Path(__file__).resolve().parents[2] / "ops" / "demo" / "improve.yaml"
    settings = load_settings(demo)
    assert settings.pairs.strategies[0] == "verified" and settings.gate.improve_suites
    assert settings.generation.max_new_tokens <= settings.eval.max_new_tokens
