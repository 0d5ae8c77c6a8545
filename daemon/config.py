"""kaizen's one typed configuration: YAML file + ``KAIZEN_*`` environment variables.

Every section forbids unknown keys, so a typo fails at start-up with the key's dotted name
instead of being silently ignored.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# The sections live in two modules (what a cycle computes; how the processes run); every name is
# importable from here, the one place the rest of kaizen imports its config from.
from daemon.config_sections import (
    EvalSettings,
    FrozenJudgeSettings,
    GateSettings,
    GenArmStageSettings,
    GenerationSettings,
    ImplicitJudgeSettings,
    JudgeNames,
    JudgeSettings,
    JudgeWarningSettings,
    LORA_ALPHA,
    LORA_R,
    LoraSettings,
    LoraTrainingSettings,
    ModelSettings,
    OpenAIJudgeSettings,
    PairSettings,
    PromptSettings,
    RespondSettings,
    Section,
    SMOLLM2_MODEL,
    SteerLMStageSettings,
    TINY_MODEL,
    TrainingSettings,
)
from daemon.config_services import (
    DashboardSettings,
    GenArmServeSettings,
    RewardModelSettings,
    ScheduleSettings,
    ServeSettings,
    TrackingSettings,
    WorkerSettings,
)

__all__ = [
    "ConfigError",
    "DashboardSettings",
    "DEFAULT_CONFIG_FILE",
    "embedded_broker_url",
    "EMBEDDED_TRANSPORT",
    "EvalSettings",
    "FrozenJudgeSettings",
    "GateSettings",
    "GenArmServeSettings",
    "GenArmStageSettings",
    "GenerationSettings",
    "ImplicitJudgeSettings",
    "JudgeNames",
    "JudgeSettings",
    "JudgeWarningSettings",
    "load_settings",
    "LORA_ALPHA",
    "LORA_R",
    "LoraSettings",
    "LoraTrainingSettings",
    "MACHINE_LOCAL_KEYS",
    "MASK",
    "ModelSettings",
    "OpenAIJudgeSettings",
    "PairSettings",
    "PromptSettings",
    "redact_snapshot",
    "redact_url",
    "RespondSettings",
    "RewardModelSettings",
    "ScheduleSettings",
    "Section",
    "ServeSettings",
    "Settings",
    "SMOLLM2_MODEL",
    "SteerLMStageSettings",
    "TINY_MODEL",
    "TrainingSettings",
    "URL_KEYS",
    "WorkerSettings",
]

DEFAULT_CONFIG_FILE = "kaizen.yaml"


# What a machine sets for itself: where its files, lineage DB and broker are, which device and how
# many threads it computes with and on which engine (model.engine), how it logs, its process settings and secrets. Everything else a
# stage computes with comes from the config its iteration recorded (Settings.for_iteration), so a
# worker with another kaizen.yaml, or an iteration resumed after a config edit, computes what the
# lineage says it did.
# The openai judge's base_url is where this machine reaches the judge server (a tunnel, an internal
# name), like database_url; which judge answers is judge.openai.model, which stays recorded.
MACHINE_LOCAL_KEYS: tuple[str, ...] = (
    "data_dir", "database_url", "artifacts_url", "log_format", "log_level",
    "model.device", "model.cpu_threads", "model.engine", "model.vllm_kv_cache_gib", "judge.openai.base_url",
    "worker", "schedule", "dashboard", "serve", "tracking",
)

# Set while Settings are rebuilt from a recorded snapshot: then the environment must not override it.
_FROM_RECORD: ContextVar[bool] = ContextVar("kaizen_settings_from_record", default=False)

# The embedded broker's kombu transport (registered by workers/broker.py) over an SQLite file.
EMBEDDED_TRANSPORT = "kaizen-sqlite"


def embedded_broker_url(db_path: str) -> str:
    return f"{EMBEDDED_TRANSPORT}+sqlite:///{db_path}"


class ConfigError(Exception):
    """A configuration problem, phrased so the user can fix it from one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KAIZEN_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Path("kaizen-data")
    database_url: str | None = None
    # Where checkpoints and datasets live: a local directory (default <data_dir>/artifacts) or any
    # fsspec URL workers on other machines can reach (s3://bucket/kaizen with the `s3` extra).
    artifacts_url: str | None = None
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
    eval: EvalSettings = EvalSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    worker: WorkerSettings = WorkerSettings()
    steerlm: SteerLMStageSettings = SteerLMStageSettings()
    genarm: GenArmStageSettings = GenArmStageSettings()
    dashboard: DashboardSettings = DashboardSettings()
    serve: ServeSettings = ServeSettings()
    tracking: TrackingSettings = TrackingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _FROM_RECORD.get():
            return (init_settings,)
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
        return self.worker.broker_url or embedded_broker_url(str(self.resolved_data_dir / "broker.db"))

    @property
    def artifacts_dir(self) -> Path:
        return self.resolved_data_dir / "artifacts"

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri or (self.resolved_data_dir / "mlruns").as_uri()

    @property
    def tensorboard_dir(self) -> Path:
        return self.resolved_data_dir / "tensorboard"

    @property
    def tiny_model_dir(self) -> Path:
        return self.resolved_data_dir / "models" / "tiny"

    def snapshot(self) -> dict[str, Any]:
        """The settings as stored with each iteration: secrets masked, URL passwords masked."""
        return redact_snapshot(self.model_dump(mode="json"))

    def secret_env(self) -> dict[str, str]:
        """``KAIZEN_*`` variables carrying every secret set here, for a child process whose
        config file is a :meth:`snapshot` (environment variables override the file)."""
        dump = self.model_dump()
        # Every URL key, since the snapshot masks the passwords in them.
        values = {_env_name(key): _get_dotted(dump, key) for key in URL_KEYS}
        values["KAIZEN_SERVE__API_KEY"] = self.serve.api_key.get_secret_value() if self.serve.api_key else None
        values["KAIZEN_DASHBOARD__TOKEN"] = self.dashboard.token.get_secret_value() if self.dashboard.token else None
        return {name: value for name, value in values.items() if value}

    def for_iteration(self, snapshot: Mapping[str, Any]) -> Settings:
        """The settings an iteration computes with: its recorded ``snapshot``, with this machine's
        :data:`MACHINE_LOCAL_KEYS` (environment variables apply to those only, through ``self``).

        An empty snapshot (an iteration recorded before snapshots existed) leaves ``self`` as it is.
        """
        if not snapshot:
            return self
        data = copy.deepcopy(dict(snapshot))
        local = self.model_dump()  # python mode: secrets stay SecretStr, not their masked text
        for key in MACHINE_LOCAL_KEYS:
            _set_dotted(data, key, _get_dotted(local, key))
        try:
            with _recorded():
                return Settings(**data)
        except ValidationError as exc:
            raise ConfigError(
                _format_validation_error(exc, "the iteration's recorded config")
                + " (recorded by another kaizen version? finish it with that version, or start a new iteration)"
            ) from None


@contextmanager
def _recorded() -> Iterator[None]:
    token = _FROM_RECORD.set(True)
    try:
        yield
    finally:
        _FROM_RECORD.reset(token)


def _env_name(key: str) -> str:
    """The ``KAIZEN_*`` variable that sets the dotted ``key`` (env_nested_delimiter is ``__``)."""
    return "KAIZEN_" + key.upper().replace(".", "__")


def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


MASK = "**********"  # what pydantic writes for a SecretStr
# Dotted keys of the settings that may hold a URL with a password in it.
URL_KEYS = ("database_url", "artifacts_url", "worker.broker_url", "tracking.mlflow_uri", "judge.openai.base_url")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by the mask: safe to log, store or show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def redact_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A copy of a settings dump with URL passwords and secret fields masked.

    Also applied when showing a stored snapshot, so a lineage recorded before secrets were
    masked does not show them either.
    """
    redacted = copy.deepcopy(snapshot)
    for dotted in URL_KEYS:
        *path, key = dotted.split(".")
        section = redacted
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and isinstance(section.get(key), str):
            section[key] = redact_url(section[key])
    for section_name, key in (("serve", "api_key"), ("dashboard", "token")):
        section = redacted.get(section_name)
        if isinstance(section, dict) and section.get(key):
            section[key] = MASK
    return redacted


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "value_error" and "error" in error.get("ctx", {}):
            message = str(error["ctx"]["error"])
        elif error["type"] == "literal_error":
            allowed = error.get("ctx", {}).get("expected", "")
            message = f"got {error.get('input')!r}, allowed values: {allowed}"
        problems.append(f"{key}: {message}")
    return f"invalid configuration in {source}: " + "; ".join(problems)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        from policies.yaml_errors import describe_yaml_error

        raise ConfigError(f"invalid YAML in {path}{describe_yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {path}: the top level must be a mapping of keys")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins key by key; a section given on the command line keeps the file's other keys."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
    data = _deep_merge(data, overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
