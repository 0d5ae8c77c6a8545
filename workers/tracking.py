"""Experiment tracking (TensorBoard, MLflow) and the MLflow Model Registry mirror of the lineage.

The one home of kaizen's tracking code. The lineage DB stays the source of truth: everything here
is a copy for the tools teams already run, so a tracking failure never fails a stage or blocks an
operator action. It is logged once per iteration, with a ``tracking_warning`` event, and the rest
of that iteration's tracking is skipped (a dead server costs one timeout, not one per call).

Interface (called by the stages at their ends and by the operator commands):

* :func:`training_reporting` - TRL's ``report_to``/``run_name`` for a training stage, with the
  TensorBoard directory and the iteration's MLflow run set for TRL's callbacks;
* :func:`record_iteration` - the iteration's run: tags, params (the config snapshot, secrets
  masked), judge/gate/suite metrics, the pair dataset and gate comparisons as artifacts;
* :func:`register_candidate` - a new candidate as a model version with the ``challenger`` alias;
* :func:`sync_registry` / :func:`mirror_registry` - model versions and aliases reconciled from the lineage.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, redact_snapshot, redact_url
from daemon.db import lineage
from daemon.db.engine import transaction
from daemon.db.models import Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, StageRun
from daemon.stage_runs import StageContext, digest_inputs
from workers import artifacts

log = structlog.get_logger(__name__)

WARNING_EVENT = "tracking_warning"
MIRROR_EVENT = "registry_mirror"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
CHECKPOINT_TAG = "kaizen.checkpoint"
ITERATION_TAG = "kaizen.iteration"

T = TypeVar("T")


def run_name(iteration_id: int) -> str:
    return f"iteration-{iteration_id:04d}"


# --------------------------------------------------------------------------- failure policy


def _warned(sessions: sessionmaker[Session], iteration_id: int) -> bool:
    with sessions() as session:
        query = select(Event.id).where(Event.kind == WARNING_EVENT, Event.iteration_id == iteration_id).limit(1)
        return session.scalar(query) is not None


def _guarded(settings: Settings, sessions: sessionmaker[Session], iteration_id: int | None, what: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None after one warning and one event when it fails (or already failed this iteration)."""
    if iteration_id is not None and _warned(sessions, iteration_id):
        return None
    try:
        return fn()
    except Exception as exc:  # tracking is a copy: whatever breaks it must not break the loop
        uri = settings.mlflow_uri
        reason = f"{what} failed, the lineage is unaffected: {type(exc).__name__}: {exc}".replace(uri, redact_url(uri))[:2000]
        log.warning("tracking.failed", iteration_id=iteration_id, what=what, reason=reason)
        with transaction(sessions) as session:
            session.add(Event(kind=WARNING_EVENT, iteration_id=iteration_id, actor="tracking", reason=reason))
        return None


def _uses(settings: Settings, backend: str) -> bool:
    return backend in settings.tracking.backends


def _client(settings: Settings):
    # A dead server must cost one short timeout, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.tracking.timeout_seconds)))
    if settings.mlflow_uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a local directory
        # needs no server, which is what a default under the data dir is for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


# --------------------------------------------------------------------------- the iteration's run


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, default=str)[:6000]
    return flat


def iteration_run_id(settings: Settings, sessions: sessionmaker[Session], iteration_id: int) -> str:
    """The MLflow run of ``iteration_id`` (found by tag, else created with the config snapshot as params)."""
    from mlflow.entities import Param

    client = _client(settings)
    experiment_id = _experiment_id(client, settings.tracking.experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{ITERATION_TAG}` = '{iteration_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    with sessions() as session:
        iteration = session.get(Iteration, iteration_id)
        snapshot = redact_snapshot(iteration.config_snapshot or {}) if iteration else {}
        parent = iteration.parent_checkpoint_id if iteration else None
    run = client.create_run(
        experiment_id, run_name=run_name(iteration_id),
        tags={ITERATION_TAG: str(iteration_id), "kaizen.parent_checkpoint": str(parent), "kaizen.config_hash": digest_inputs(snapshot)},
    )
    params = [Param(f"config.{k}", v) for k, v in _flatten(snapshot).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


@contextmanager
def training_reporting(ctx: StageContext, stage: str) -> Iterator[dict[str, Any]]:
    """TRL config arguments (``report_to``, ``run_name``) that send ``stage``'s training curves to
    the configured backends: TensorBoard under <data_dir>/tensorboard/iteration-N/<stage>, MLflow
    into the iteration's run (TRL's callbacks read their targets from the environment)."""
    settings, env, report_to = ctx.settings, {}, []
    if _uses(settings, "tensorboard"):
        env["TENSORBOARD_LOGGING_DIR"] = str(settings.tensorboard_dir / run_name(ctx.iteration_id) / stage)
        report_to.append("tensorboard")
    if _uses(settings, "mlflow"):
        run_id = _guarded(settings, ctx.sessions, ctx.iteration_id, "mlflow run", lambda: iteration_run_id(settings, ctx.sessions, ctx.iteration_id))
        if run_id is not None:
            env.update(MLFLOW_TRACKING_URI=settings.mlflow_uri, MLFLOW_RUN_ID=run_id, MLFLOW_EXPERIMENT_NAME=settings.tracking.experiment)
            # No TrainingArguments as params: the run's config.* params hold the same settings, and a
            # retried or second training (SteerLM, then DPO) would re-log output_dir and friends with
            # other values, which MLflow refuses (that would fail the stage).
            env["MLFLOW_MAX_LOG_PARAMS"] = "0"
            report_to.append("mlflow")
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield {"report_to": report_to or "none", "run_name": run_name(ctx.iteration_id)}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _numbers(data: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _iteration_metrics(session: Session, iteration_id: int, suite_scores: list[dict[str, Any]]) -> tuple[dict[str, float], Evaluation | None]:
    results = {r.stage: r.result or {} for r in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id))}
    metrics: dict[str, float] = {}
    for stage, result in results.items():
        metrics.update(_numbers(result, f"{stage}."))
        for key, value in result.items():
            if isinstance(value, Mapping) and key.endswith("metrics"):
                metrics.update(_numbers(value, f"{stage}.{key}."))
    evaluation = session.scalars(select(Evaluation).where(Evaluation.iteration_id == iteration_id).order_by(Evaluation.id.desc())).first()
    if evaluation is not None:
        gate_numbers = {k: getattr(evaluation, k) for k in ("win_rate", "win_rate_lower_bound", "wins", "losses", "ties", "length_ratio", "parse_failure_rate")}
        metrics.update(_numbers({k: v for k, v in gate_numbers.items() if v is not None}, "gate."))
    for row in suite_scores:
        if row.get("score") is not None:
            metrics[f"suite.{row['suite']}.{row['checkpoint']}"] = float(row["score"])
    return {k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")}, evaluation


def record_iteration(ctx: StageContext, suite_scores: list[dict[str, Any]]) -> None:
    """The finished iteration in the configured backends; then the registry mirror (guarded)."""
    settings = ctx.settings
    if not settings.tracking.backends:
        return
    with ctx.sessions() as session:
        iteration = ctx.iteration(session)
        tags = {"kaizen.candidate": str(iteration.candidate_checkpoint_id), "kaizen.decision": str(iteration.decision)}
        metrics, evaluation = _iteration_metrics(session, ctx.iteration_id, suite_scores)
        comparisons = (evaluation.comparisons or {}).get("items", []) if evaluation is not None else []
        dataset = next((r.result.get("dataset") for r in session.scalars(select(StageRun).where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "dpo_update"))), None)
    if _uses(settings, "tensorboard"):
        _guarded(settings, ctx.sessions, ctx.iteration_id, "tensorboard", lambda: _tensorboard_scalars(settings, ctx.iteration_id, metrics))
    if _uses(settings, "mlflow"):
        _guarded(settings, ctx.sessions, ctx.iteration_id, "mlflow metrics", lambda: _mlflow_iteration(ctx, tags, metrics, comparisons, dataset))
        mirror_registry(settings, ctx.sessions, iteration_id=ctx.iteration_id)


def _tensorboard_scalars(settings: Settings, iteration_id: int, metrics: Mapping[str, float]) -> None:
    # TensorBoard's own writer: the operator paths (dashboard, CLI) that import this module stay torch-free.
    from tensorboard.summary import Writer

    writer = Writer(str(settings.tensorboard_dir / run_name(iteration_id) / "iteration"))
    try:
        for name, value in metrics.items():
            writer.add_scalar(name, value, step=iteration_id)
    finally:
        writer.close()


def _mlflow_iteration(ctx: StageContext, tags: dict[str, str], metrics: Mapping[str, float], comparisons: list, dataset: str | None) -> None:
    from mlflow.entities import Metric, RunTag

    client = _client(ctx.settings)
    run_id = iteration_run_id(ctx.settings, ctx.sessions, ctx.iteration_id)
    now = int(1000 * __import__("time").time())
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, ctx.iteration_id) for k, v in metrics.items()], tags=[RunTag(k, v) for k, v in tags.items()]
    )
    if dataset and artifacts.is_local(dataset) and artifacts.local_path(dataset).exists():
        client.log_artifact(run_id, str(artifacts.local_path(dataset)), "datasets")
    with tempfile.TemporaryDirectory(prefix="kaizen-track-") as tmp:
        path = Path(tmp) / "gate_comparisons.json"
        path.write_text(json.dumps(comparisons, ensure_ascii=False, indent=1, default=str))
        client.log_artifact(run_id, str(path), "gate")
    client.set_terminated(run_id)


# --------------------------------------------------------------------------- registry mirror


def _source(path: str) -> str:
    return Path(path).resolve().as_uri() if artifacts.is_local(path) else path


def _versions(client, name: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="kaizen checkpoints; the lineage DB is the source of truth")
    return {v.tags.get(CHECKPOINT_TAG): v for v in client.search_model_versions(f"name='{name}'")}


def _register(client, name: str, versions: dict[str, Any], checkpoint: Checkpoint) -> str:
    version = versions.get(checkpoint.id)
    if version is None:
        version = client.create_model_version(name, _source(checkpoint.path), tags={CHECKPOINT_TAG: checkpoint.id})
        versions[checkpoint.id] = version
    client.set_model_version_tag(name, version.version, "kaizen.status", checkpoint.status.value)
    return version.version


def register_candidate(ctx: StageContext, checkpoint_id: str, uri: str) -> None:
    """A new candidate as a model version holding the ``challenger`` alias (guarded)."""
    if not _uses(ctx.settings, "mlflow"):
        return

    def register() -> None:
        client, name = _client(ctx.settings), ctx.settings.tracking.registered_model
        versions = _versions(client, name)
        candidate = Checkpoint(id=checkpoint_id, path=uri, status=CheckpointStatus.candidate)
        client.set_registered_model_alias(name, CHALLENGER_ALIAS, _register(client, name, versions, candidate))

    _guarded(ctx.settings, ctx.sessions, ctx.iteration_id, "registry candidate", register)


def sync_registry(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """Reconcile the registry from the lineage: a version per checkpoint, ``champion`` on the
    champion, ``challenger`` on the newest undecided candidate (removed when there is none). Raises on failure."""
    client, name = _client(settings), settings.tracking.registered_model
    with sessions() as session:
        checkpoints = list(session.scalars(select(Checkpoint).order_by(Checkpoint.id)))
        champion = lineage.current_champion(session)
        for checkpoint in checkpoints:
            session.expunge(checkpoint)
    versions = _versions(client, name)
    numbers = {c.id: _register(client, name, versions, c) for c in checkpoints}
    if champion is not None:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, numbers[champion.id])
    candidates = [c.id for c in checkpoints if c.status == CheckpointStatus.candidate]
    if candidates:
        client.set_registered_model_alias(name, CHALLENGER_ALIAS, numbers[candidates[-1]])
    elif CHALLENGER_ALIAS in (client.get_registered_model(name).aliases or {}):
        client.delete_registered_model_alias(name, CHALLENGER_ALIAS)
    return {"model": name, "versions": len(numbers), "champion": champion.id if champion else None}


def mirror_registry(settings: Settings, sessions: sessionmaker[Session], *, iteration_id: int | None = None, actor: str = "tracking") -> str | None:
    """:func:`sync_registry` after a lineage change, its result recorded as a ``registry_mirror``
    event; a failure is a warning event and the next sync (every iteration, `kaizen registry sync`) retries."""
    if not _uses(settings, "mlflow"):
        return None
    result = _guarded(settings, sessions, iteration_id, "registry mirror", lambda: sync_registry(settings, sessions))
    if result is None:
        return None
    message = f"{result['model']}: {result['versions']} versions, champion alias on {result['champion']}"
    with transaction(sessions) as session:
        session.add(Event(kind=MIRROR_EVENT, iteration_id=iteration_id, checkpoint_id=result["champion"], actor=actor, reason=message))
    return message
