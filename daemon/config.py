"""kaizen's one typed configuration: YAML file + ``KAIZEN_*`` environment variables.

Every section forbids unknown keys, so a typo fails at start-up with the key's dotted name
instead of being silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

TINY_MODEL = "tiny"
DEFAULT_CONFIG_FILE = "kaizen.yaml"


class ConfigError(Exception):
    """A configuration problem, phrased so the user can fix it from one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    # "tiny" is the built-in model `kaizen init` builds; anything else goes to from_pretrained.
    path: str = TINY_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"


class GenerationSettings(Section):
    max_new_tokens: int = Field(48, ge=1, le=8192)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)


class PromptSettings(Section):
    per_cycle: int = Field(8, ge=1, description="new prompts accepted per cycle")
    few_shot: int = Field(6, ge=1)
    max_rounds: int = Field(4, ge=1, description="self-instruct generations tried before topping up from seeds")
    max_overlap: float = Field(0.7, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(80, ge=1)


class RespondSettings(Section):
    num_samples: int = Field(4, ge=2)


class JudgeSettings(Section):
    num_samples: int = Field(2, ge=1, description="K judge samples averaged per response")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=5.0)


class PairSettings(Section):
    strategy: Literal["self_reward", "rlcd", "both"] = "both"
    min_score_gap: float = Field(0.5, ge=0.0)


class TrainingSettings(Section):
    beta: float = Field(0.1, gt=0.0)
    learning_rate: float = Field(5e-4, gt=0.0)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    max_length: int = Field(512, ge=16)
    min_pairs: int = Field(1, ge=1, description="fewer pairs than this skips training and rejects the cycle")


class GateSettings(Section):
    heldout_prompts: int = Field(8, ge=1)
    min_win_rate_lower_bound: float = Field(0.5, ge=0.0, lt=1.0)
    z: float = Field(1.96, gt=0.0)
    min_comparisons: int = Field(4, ge=1)
    max_length_ratio: float = Field(1.5, gt=0.0)
    max_parse_failure_rate: float = Field(0.5, ge=0.0, le=1.0)


class ScheduleSettings(Section):
    interval_seconds: float | None = Field(5.0, gt=0.0)
    cron: str | None = None
    max_cycles: int | None = Field(None, ge=1, description="stop the daemon after this many cycles")
    # A cycle that fails this many times in a row (a dead worker, an unreachable broker) stops the
    # daemon with an error instead of retrying forever; null retries forever.
    max_consecutive_failures: int | None = Field(5, ge=1)

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleSettings:
        if self.cron:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.cron)
            except ValueError as exc:
                raise ValueError(f"invalid crontab {self.cron!r}: {exc}") from None
        elif self.interval_seconds is None:
            raise ValueError("set either interval_seconds or cron")
        return self


class WorkerSettings(Section):
    # eager: stages run in the daemon's own process; local: the daemon starts one Celery worker
    # subprocess over an SQLite broker; external: workers are started separately (`kaizen worker`).
    mode: Literal["eager", "local", "external"] = "local"
    broker_url: str | None = None
    stage_timeout_seconds: float = Field(6 * 3600, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KAIZEN_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Path("kaizen-data")
    database_url: str | None = None
    seed: int = 0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    prompts: PromptSettings = PromptSettings()
    respond: RespondSettings = RespondSettings()
    judge: JudgeSettings = JudgeSettings()
    pairs: PairSettings = PairSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the file so operators can tweak one key per deployment.
        return env_settings, init_settings

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'lineage.db'}"

    @property
    def resolved_broker_url(self) -> str:
        from workers.broker import embedded_broker_url

        return self.worker.broker_url or embedded_broker_url(str(self.resolved_data_dir / "broker.db"))

    @property
    def artifacts_dir(self) -> Path:
        return self.resolved_data_dir / "artifacts"

    @property
    def tiny_model_dir(self) -> Path:
        return self.resolved_data_dir / "models" / "tiny"

    def snapshot(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "literal_error":
            allowed = error.get("ctx", {}).get("expected", "")
            message = f"got {error.get('input')!r}, allowed values: {allowed}"
        problems.append(f"{key}: {message}")
    return f"invalid configuration in {source}: " + "; ".join(problems)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {path}: the top level must be a mapping of keys")
    return data


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or ./kaizen.yaml if present) plus env; raise ConfigError."""
    source = "defaults"
    data: dict[str, Any] = {}
    candidate = Path(path) if path else Path(os.environ.get("KAIZEN_CONFIG", DEFAULT_CONFIG_FILE))
    if path and not candidate.exists():
        raise ConfigError(f"config file {candidate} does not exist")
    if candidate.exists():
        data = _read_yaml(candidate)
        source = str(candidate)
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
