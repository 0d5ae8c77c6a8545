"""Tracking (TensorBoard, MLflow) and the MLflow Model Registry mirror, on real tiny cycles."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.bootstrap import initialise
from daemon.cli import app
from daemon.cycle import run_cycle
from daemon.db import lineage
from daemon.db.models import Event, Iteration
from daemon.dispatch import EagerDispatcher
from daemon.logs import configure_logging
from tests.factories import small_cycle_config
from daemon.config import load_settings
from workers.tracking import MIRROR_EVENT, WARNING_EVENT

pytestmark = pytest.mark.slow

SECRET = "hunter2-serve-key"
# A gate that promotes on any win or tie, so two tiny cycles move the champion.
EAGER_GATE = {"min_win_rate_lower_bound": 0.0, "z": 0.1, "max_length_ratio": 100.0, "max_parse_failure_rate": 1.0}


def _config(tmp_path: Path, tiny_model_dir: Path, tracking: dict) -> dict:
    return small_cycle_config(tmp_path / "data", tiny_model_dir, gate=EAGER_GATE, tracking=tracking, serve={"api_key": SECRET})


def _scalars(directory: Path, tag: str) -> list[float]:
    """The values of scalar ``tag`` in the event files under ``directory`` (TensorBoard's own reader;
    scalars written as v1 summaries or as v2 tensor summaries, as TensorBoard's scalars page shows both)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    values = []
    for events in sorted(directory.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        tags = accumulator.Tags()
        if tag in tags["scalars"]:
            values += [e.value for e in accumulator.Scalars(tag)]
        if tag in tags["tensors"]:
            values += [float(make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]
    return values


def test_two_cycles_are_tracked_in_mlflow_and_tensorboard_and_the_registry_follows_the_champion(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path, tiny_model_dir, {"backends": ["tensorboard", "mlflow"]})
    settings = load_settings(None, **config)
    sessions = initialise(settings)
    for _ in range(2):
        run_cycle(sessions, settings, EagerDispatcher(settings, sessions))

    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert settings.mlflow_uri.startswith("file://") and (settings.resolved_data_dir / "mlruns").is_dir()
    experiment = client.get_experiment_by_name("kaizen")
    runs = client.search_runs([experiment.experiment_id])
    with sessions() as session:
        iterations = {i.id: i for i in session.scalars(select(Iteration))}
        champion = lineage.current_champion(session).id
        assert not session.scalars(select(Event).where(Event.kind == WARNING_EVENT)).all()
    assert sorted(int(r.data.tags["kaizen.iteration"]) for r in runs) == sorted(iterations) == [1, 2]
    for run in runs:
        iteration = iterations[int(run.data.tags["kaizen.iteration"])]
        assert run.info.run_name == f"iteration-{iteration.id:04d}"
        assert run.data.tags["kaizen.decision"] == iteration.decision
        assert run.data.tags["kaizen.parent_checkpoint"] == iteration.parent_checkpoint_id
        assert run.data.tags["kaizen.candidate"] == str(iteration.candidate_checkpoint_id)
        assert len(run.data.tags["kaizen.config_hash"]) == 64
        # The DPO loss curve came through TRL's MLflow callback: one point per logged step.
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert len(losses) == settings.training.max_steps
        assert "gate.win_rate" in run.data.metrics and 0.0 <= run.data.metrics["gate.win_rate"] <= 1.0
        assert run.data.params["config.training.beta"] == str(settings.training.beta)
        assert all(SECRET not in value for value in run.data.params.values())
        assert "output_dir" not in run.data.params  # TRL's arguments stay out: a retried training could not re-log them
        assert run.data.params["config.serve.api_key"] == '"**********"'
        names = {a.path for a in client.list_artifacts(run.info.run_id, "datasets")} | {a.path for a in client.list_artifacts(run.info.run_id, "gate")}
        assert names == {"datasets/preference_pairs.jsonl", "gate/gate_comparisons.json"}
        # TensorBoard: TRL's training curve and the gate numbers, under <data_dir>/tensorboard.
        run_dir = settings.tensorboard_dir / f"iteration-{iteration.id:04d}"
        assert len(_scalars(run_dir / "dpo_update", "train/loss")) == settings.training.max_steps
        assert _scalars(run_dir / "iteration", "gate.win_rate") == [pytest.approx(run.data.metrics["gate.win_rate"])]

    def champion_alias() -> str:
        version = client.get_model_version_by_alias("kaizen", "champion")
        return version.tags["kaizen.checkpoint"]

    assert champion_alias() == champion
    assert champion != lineage.INITIAL_CHECKPOINT_ID, "the eager gate promoted at least once"

    config_file = tmp_path / "kaizen.yaml"
    config_file.write_text(yaml.safe_dump(config))
    _kaizen("rollback", "--config", str(config_file), "--reason", "test")
    with sessions() as session:
        restored = lineage.current_champion(session).id
        mirrored = session.scalars(select(Event).where(Event.kind == MIRROR_EVENT, Event.actor == "cli")).one()
    assert restored != champion and champion_alias() == restored
    assert restored in mirrored.reason

    # An out-of-date mirror (the alias moved by hand) is reconciled from the lineage.
    client.delete_registered_model_alias("kaizen", "champion")
    _kaizen("registry", "sync", "--config", str(config_file))
    assert champion_alias() == restored


def _kaizen(*args: str):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, list(args))
    configure_logging()  # the CLI bound the logs to the runner's stream, closed now
    assert result.exit_code == 0, result.output
    return result


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_tracking_server_warns_once_and_the_cycle_completes(tmp_path: Path, tiny_model_dir: Path) -> None:
    uri = f"http://user:s3cret@127.0.0.1:{_closed_port()}"
    settings = load_settings(None, **_config(tmp_path, tiny_model_dir, {"backends": ["mlflow"], "mlflow_uri": uri, "timeout_seconds": 2}))
    sessions = initialise(settings)
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        iteration = session.get(Iteration, report.iteration_id)
        warnings = session.scalars(select(Event).where(Event.kind == WARNING_EVENT)).all()
        assert iteration.decision in {"promoted", "rejected"}
        assert iteration.config_snapshot["tracking"]["mlflow_uri"] == f"http://user:**********@127.0.0.1:{uri.rsplit(':', 1)[1]}"
    assert len(warnings) == 1 and warnings[0].iteration_id == report.iteration_id
    assert "s3cret" not in warnings[0].reason and "lineage is unaffected" in warnings[0].reason


def test_the_steerlm_sft_curve_goes_to_tensorboard_through_trl(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os

    from daemon.config import SteerLMStageSettings
    from daemon.stage_runs import StageContext
    from policies.steerlm import ATTRIBUTES
    from workers import tracking
    from workers.steerlm import SteerExample, sft_attribute_conditioned

    settings = load_settings(None, **_config(tmp_path, tiny_model_dir, {"backends": ["tensorboard"]}))
    ctx = StageContext(settings=settings, sessions=None, iteration_id=7)  # type: ignore[arg-type]  # TensorBoard needs no DB
    examples = [SteerExample("Say hi.", answer, dict.fromkeys(ATTRIBUTES, 2)) for answer in ("Hi.", "Hello there.")]
    with tracking.training_reporting(ctx, "steerlm_sft") as reporting:
        assert reporting == {"report_to": ["tensorboard"], "run_name": "iteration-0007"}
        sft_attribute_conditioned(
            str(tiny_model_dir), examples, tmp_path / "sft", SteerLMStageSettings(max_steps=2, batch_size=2), reporting=reporting
        )
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # the stage's environment is restored
    assert len(_scalars(settings.tensorboard_dir / "iteration-0007" / "steerlm_sft", "train/loss")) == 2
