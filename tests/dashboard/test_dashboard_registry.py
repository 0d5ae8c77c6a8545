"""The dashboard's rollback moves the MLflow registry's champion alias in the same step."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from daemon.config_services import TrackingSettings
from daemon.dashboard import create_dashboard_app
from daemon.db.models import Event
from workers.tracking import MIRROR_EVENT

from .conftest import TOKEN, Seeded


def test_a_dashboard_rollback_moves_the_champion_alias(seeded: Seeded) -> None:
    from mlflow.tracking import MlflowClient

    settings = seeded.settings.model_copy(update={"tracking": TrackingSettings(backends=["mlflow"])})
    c = TestClient(create_dashboard_app(settings, seeded.sessions), base_url="http://127.0.0.1")
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    before = seeded.champion()
    rolled = c.post("/actions/rollback", json={"reason": "bad answers"}, headers=headers)
    assert rolled.status_code == 200 and "registry: kaizen:" in rolled.json()["message"]
    after = seeded.champion()
    assert after != before
    registry = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert registry.get_model_version_by_alias("kaizen", "champion").tags["kaizen.checkpoint"] == after
    assert len(registry.search_model_versions("name='kaizen'")) == len(seeded.checkpoints())
    with seeded.sessions() as session:
        (mirrored,) = session.scalars(select(Event).where(Event.kind == MIRROR_EVENT)).all()
    assert mirrored.checkpoint_id == after and mirrored.actor.startswith("dashboard@")
