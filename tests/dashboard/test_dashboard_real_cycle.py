"""The dashboard and `kaizen show` on a lineage written by a real cycle of the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from daemon.bootstrap import initialise
from daemon.cli import app
from daemon.cycle import run_cycle
from daemon.dashboard import create_dashboard_app
from daemon.dispatch import EagerDispatcher
from daemon.logs import configure_logging
from tests.factories import small_cycle_settings

pytestmark = pytest.mark.slow


def test_a_real_iteration_shows_its_stages_scores_training_log_and_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir)
    sessions = initialise(settings)
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    client = TestClient(create_dashboard_app(settings, sessions), base_url="http://127.0.0.1")

    detail = client.get(f"/api/iterations/{report.iteration_id}").json()
    assert set(detail["stages"]) == {"generate_prompts", "respond", "judge", "build_pairs", "dpo_update", "evaluate_gate", "evaluate_suites"}
    assert detail["mean_response_tokens"] > 0
    assert sum(detail["score_histogram"].values()) == detail["judge"]["judgments"] > 0
    assert detail["samples"] and detail["samples"][0]["responses"]
    if detail["candidate"]:  # trained: TRL's per-step log comes from the checkpoint manifest
        assert detail["training_log"] and detail["training_log"][0]["loss"] is not None
        assert detail["training"]["loss"] is not None

    page = client.get(f"/iterations/{report.iteration_id}")
    assert page.status_code == 200 and detail["samples"][0]["text"][:20] in page.text
    if detail["comparisons"]:  # gated: each comparison says who judged it and the debiased preference
        assert all(c["judge"] == "verifier+self:logprob" and 0.0 <= c["preference"] <= 1.0 for c in detail["comparisons"])
        assert "verifier+self:logprob" in page.text
    overview = client.get("/")
    assert overview.status_code == 200 and f'data-checkpoint="{detail["parent"]}"' in overview.text
    assert f'kaizen_iterations_total{{decision="{report.decision}",status="completed"}} 1.0' in client.get("/metrics").text

    shown = CliRunner().invoke(app, ["show", str(report.iteration_id), "--data-dir", str(settings.data_dir)])
    configure_logging()
    assert shown.exit_code == 0, shown.output
    assert "judge scores:" in shown.stdout and "dpo_update" in shown.stdout
