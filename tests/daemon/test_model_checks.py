"""Bad models fail at `kaizen init`, `kaizen serve` start or config load: one line naming the key and the fix, exit != 0, nothing registered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import Checkpoint
from daemon.logs import configure_logging
from tests.factories import small_cycle_config
from workers.tiny_model import build_tiny_model


def invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args)
    configure_logging()  # the CLI pointed structlog at the runner's captured stderr, closed now
    return result


def kaizen_lines(result) -> list[str]:  # type: ignore[no-untyped-def]
    """The CLI's own error lines (structlog may log to the same stream)."""
    return [line for line in result.stderr.splitlines() if line.startswith("kaizen:")]


def registered_checkpoints(data_dir: Path) -> int:
    db = data_dir / "lineage.db"
    if not db.exists():
        return 0
    with make_session_factory(make_engine(f"sqlite:///{db}"))() as session:
        return session.scalar(select(func.count()).select_from(Checkpoint)) or 0


def write_config(tmp_path: Path, model_path: str | Path, **overrides) -> Path:  # type: ignore[no-untyped-def]
    config = tmp_path / "kaizen.yaml"
    config.write_text(yaml.safe_dump(small_cycle_config(tmp_path / "data", Path(model_path), **overrides)))
    return config


def assert_refused(result, data_dir: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    lines = kaizen_lines(result)
    assert result.exit_code != 0, result.output
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert registered_checkpoints(data_dir) == 0


@pytest.fixture(scope="module")
def no_eos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("noeos") / "m", hidden_size=32, eos_token=False, chat_template=None)


def test_a_directory_that_does_not_exist_is_refused_at_init(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "no-such-model")
    result = invoke(["init", "--config", str(config)])
    assert_refused(result, tmp_path / "data", "model.path", "does not exist", "set model.path")


def test_a_directory_without_config_is_refused_at_init(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").unlink()
    result = invoke(["init", "--config", str(write_config(tmp_path, broken))])
    assert_refused(result, tmp_path / "data", "model.path", "config.json", "save_pretrained")


def test_a_missing_gguf_file_is_refused_at_init(tmp_path: Path) -> None:
    result = invoke(["init", "--config", str(write_config(tmp_path, tmp_path / "gone.Q4_0.gguf"))])
    assert_refused(result, tmp_path / "data", "model.path", "GGUF file", "does not exist")
    assert "Traceback" not in result.output


def test_a_tokenizer_without_eos_is_refused_at_init(tmp_path: Path, no_eos_model: Path) -> None:
    result = invoke(["init", "--config", str(write_config(tmp_path, no_eos_model))])
    assert_refused(result, tmp_path / "data", "model.path", "no eos token", "eos_token")


def test_a_hub_id_while_offline_names_hf_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(["init", "--config", str(write_config(tmp_path, "someone/some-model"))])
    assert_refused(result, tmp_path / "data", "model.path", "HF_HUB_OFFLINE=0")


def test_a_genarm_base_model_with_another_tokenizer_is_refused_at_config_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = build_tiny_model(tmp_path / "other", hidden_size=32, extra_corpus=["a completely different corpus of words"] * 3)
    config = write_config(tmp_path, tiny_model_dir, genarm={"enabled": True, "base_model_path": str(other)})
    result = invoke(["init", "--config", str(config)])
    assert_refused(result, tmp_path / "data", "genarm.base_model_path", "tokenizer", "set genarm.base_model_path")


def test_a_missing_genarm_base_model_is_refused_at_config_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, genarm={"enabled": True, "base_model_path": str(tmp_path / "nope")})
    result = invoke(["cycle", "--config", str(config)])
    assert_refused(result, tmp_path / "data", "genarm.base_model_path", "does not exist")


@pytest.mark.parametrize("problem", ["missing", "other tokenizer"])
def test_a_bad_reward_model_path_is_refused_at_serve_start(tmp_path: Path, tiny_model_dir: Path, problem: str) -> None:
    if problem == "missing":
        path, needle = tmp_path / "arm", "does not exist"
    else:
        path, needle = build_tiny_model(tmp_path / "other", hidden_size=32, extra_corpus=["a completely different corpus of words"] * 3), "tokenizer"
    config = write_config(tmp_path, tiny_model_dir, serve={"genarm": {"reward_models": {"arm": {"path": str(path)}}}})
    assert invoke(["init", "--config", str(config)]).exit_code == 0
    result = invoke(["serve", "--config", str(config)])
    lines = kaizen_lines(result)
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "serve.genarm.reward_models.arm.path" in lines[0] and needle in lines[0]


def test_a_good_model_is_registered_with_its_profile(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = invoke(["init", "--config", str(write_config(tmp_path, tiny_model_dir))])
    assert result.exit_code == 0, result.output
    with make_session_factory(make_engine(f"sqlite:///{tmp_path / 'data' / 'lineage.db'}"))() as session:
        champion = session.scalars(select(Checkpoint)).one()
    assert champion.profile["context_length"] == 2048
    assert champion.profile["prompt_format"] == "chat_template"
    assert champion.profile["eos_token_ids"] == [2]
