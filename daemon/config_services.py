"""The sections of kaizen's config that run its processes: the scheduler, the workers, the
dashboard and the server. They are machine-local (``daemon.config.MACHINE_LOCAL_KEYS``): a worker
takes them from its own config, never from an iteration's recorded one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from daemon.config_sections import Section
from policies.steering import DEFAULT_METHOD as DEFAULT_STEERING
from policies.steering import METHODS as STEERING_METHODS


class ScheduleSettings(Section):
    interval_seconds: float | None = Field(5.0, gt=0.0)
    cron: str | None = None
    max_cycles: int | None = Field(None, ge=1, description="stop the daemon after this many cycles")
    # A cycle that fails this many times in a row (a dead worker, an unreachable broker) stops the
    # daemon with an error instead of retrying forever; null retries forever.
    max_consecutive_failures: int | None = Field(5, ge=1)
    # A second daemon on the same lineage DB waits as standby and retries the leader lock this often.
    standby_poll_seconds: float = Field(5.0, gt=0)
    # How long the daemon keeps retrying an unreachable lineage DB (capped exponential backoff with
    # jitter, one log line per outage) before the cycle fails.
    db_outage_seconds: float = Field(900.0, gt=0)
    # A failed cycle waits interval x 2^(failures-1) before the next attempt, at most this long.
    max_failure_backoff_seconds: float = Field(600.0, ge=0)

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
    # Celery's soft shutdown: on a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT)
    # a running stage gets this long before it is killed; trainer state saved every
    # training.save_steps survives either way and the next attempt resumes from it. A warm
    # shutdown (SIGTERM) makes a running trainer save at once and hand over (workers/graceful_stop.py).
    # `kaizen run` stopping its local worker gives that warm shutdown this long, then kills the worker.
    soft_shutdown_seconds: float = Field(60.0, ge=0)


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
    # The served model's weights: auto is float32 on a CPU and the checkpoint's own dtype on a GPU.
    # bfloat16 halves the weights' memory; on CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids
    # and later) it also decodes batches faster (see README, "Serving the champion").
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    genarm: GenArmServeSettings = GenArmServeSettings()


class TrackingSettings(Section):
    """Where each iteration is reported besides the lineage DB (which stays the source of truth)."""

    backends: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    # An MLflow tracking server (http://host:5000) or a local store; null: <data_dir>/mlruns.
    mlflow_uri: str | None = None
    experiment: str = "kaizen"
    # The MLflow Model Registry model whose versions mirror the lineage's checkpoints.
    registered_model: str = "kaizen"
    # Seconds an MLflow call may take (a dead server must not stall a stage).
    timeout_seconds: float = Field(5.0, gt=0)
