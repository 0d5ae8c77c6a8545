"""The dashboard's pages, JSON API, /metrics and guarded actions over HTTP (no browser)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from daemon.dashboard import create_dashboard_app
from daemon.db import lineage
from daemon.db.models import Checkpoint, Iteration, Judgment

from .conftest import TOKEN, Seeded


def client(seeded: Seeded) -> TestClient:
    return TestClient(create_dashboard_app(seeded.settings, seeded.sessions), base_url="http://127.0.0.1")


def test_the_overview_draws_every_seeded_checkpoint_and_marks_champion_and_rejected(seeded: Seeded) -> None:
    html = client(seeded).get("/").text
    nodes = {cid: css for css, cid in re.findall(r'<g class="node (\w+)" data-checkpoint="([\w-]+)"', html)}
    checkpoints = seeded.checkpoints()
    assert set(nodes) == {c.id for c in checkpoints}
    assert nodes[seeded.champion()] == "champion"
    assert [cid for cid, css in nodes.items() if css == "champion"] == [seeded.champion()]
    assert {cid for cid, css in nodes.items() if css == "rejected"} == {c.id for c in checkpoints if c.status.value == "rejected"}
    for chart in ("chart-win-rate", "chart-scores", "chart-training", "chart-length", "chart-stages"):
        assert f'id="{chart}"' in html


def test_the_iteration_page_and_api_agree_with_the_db(seeded: Seeded) -> None:
    c = client(seeded)
    assert c.get("/iterations/2").status_code == 200
    detail = c.get("/api/iterations/2").json()
    with seeded.sessions() as session:
        judged = session.scalar(select(func.count()).select_from(Judgment).where(Judgment.iteration_id == 2))
    assert sum(detail["score_histogram"].values()) == judged
    missing = c.get("/iterations/999")
    assert missing.status_code == 404 and "iterations are numbered 1..14" in missing.text


def test_metrics_expose_cycles_stage_durations_win_rate_champion_and_queue_depth(seeded: Seeded) -> None:
    response = client(seeded).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    iterations = {tuple(sorted(s.labels.items())): s.value for s in families["kaizen_iterations"].samples if s.name.endswith("_total")}
    with seeded.sessions() as session:
        expected = session.execute(select(Iteration.decision, func.count()).group_by(Iteration.decision)).all()
    assert {dict(k)["decision"]: v for k, v in iterations.items()} == {d: n for d, n in expected}
    counts = {s.labels["stage"]: s.value for s in families["kaizen_stage_duration_seconds"].samples if s.name.endswith("_count")}
    assert counts["judge"] == 14
    info = families["kaizen_champion_info"].samples[0]  # the text format exposes an Info as a gauge
    assert info.labels["checkpoint"] == seeded.champion()
    assert 0.0 <= families["kaizen_gate_win_rate"].samples[0].value <= 1.0
    assert {s.labels["state"] for s in families["kaizen_stage_queue_depth"].samples} == {"queued", "running"}
    assert families["kaizen_paused"].samples[0].value == 0


def test_promote_with_the_token_changes_the_champion_and_audits_the_client(seeded: Seeded) -> None:
    target = seeded.promotable()
    response = client(seeded).post("/actions/promote", data={"token": TOKEN, "checkpoint": target, "reason": "canary looked good"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/?done=")
    assert seeded.champion() == target
    (event,) = seeded.events(lineage.MANUAL_PROMOTION_EVENT)
    assert (event.checkpoint_id, event.actor, event.reason) == (target, "dashboard@testclient", "canary looked good")


@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_an_action_whose_target_fails_its_manifest_is_refused_with_409(seeded: Seeded, action: str) -> None:
    from pathlib import Path

    with seeded.sessions() as session:
        target = seeded.promotable() if action == "promote" else lineage.rollback_target(session)
        path = Path(session.get(Checkpoint, target).path)
    weights = path / "weights.safetensors"
    weights.write_bytes(bytes(b ^ 1 for b in weights.read_bytes()))  # same size, other content
    before = seeded.champion()
    form = {"token": TOKEN} | ({"checkpoint": target} if action == "promote" else {})
    response = client(seeded).post(f"/actions/{action}", data=form, headers={"accept": "application/json"})
    assert response.status_code == 409 and f"refusing {target}: it does not verify" in response.json()["error"]
    assert seeded.champion() == before


@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_promote_without_the_right_token_is_refused_with_401_and_changes_nothing(seeded: Seeded, token: str | None) -> None:
    before = seeded.champion()
    form = {"checkpoint": seeded.promotable()} | ({"token": token} if token is not None else {})
    response = client(seeded).post("/actions/promote", data=form)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert seeded.champion() == before
    assert seeded.events(lineage.MANUAL_PROMOTION_EVENT) == []


def test_without_a_configured_token_actions_are_disabled_and_refused_with_403(seeded_without_token: Seeded) -> None:
    c = client(seeded_without_token)
    page = c.get("/").text
    assert re.search(r'id="promote-button"[^>]*disabled', page) and "KAIZEN_DASHBOARD__TOKEN" in page
    before = seeded_without_token.champion()
    response = c.post("/actions/rollback", data={"token": "anything"})
    assert response.status_code == 403 and "dashboard.token" in response.text
    assert seeded_without_token.champion() == before


def test_json_clients_use_a_bearer_token_and_get_lineage_errors_as_409(seeded: Seeded) -> None:
    c = client(seeded)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    refused = c.post("/actions/promote", json={"checkpoint": seeded.rejected()}, headers=headers)
    assert refused.status_code == 409 and "rejected by the gate" in refused.json()["error"]
    before = seeded.champion()
    rolled = c.post("/actions/rollback", json={"reason": "bad answers"}, headers=headers)
    assert rolled.status_code == 200 and rolled.json()["ok"] is True
    (event,) = seeded.events(lineage.ROLLBACK_EVENT)
    assert event.previous_checkpoint_id == before and seeded.champion() == event.checkpoint_id != before


def test_pause_and_resume_from_the_dashboard(seeded: Seeded) -> None:
    c = client(seeded)
    assert c.post("/actions/pause", data={"token": TOKEN, "reason": "maintenance"}).status_code == 200  # after the redirect
    assert c.get("/api/status").json()["paused"] is True
    again = c.post("/actions/pause", data={"token": TOKEN}, follow_redirects=False)
    assert again.headers["location"] == "/?unchanged=pause"
    c.post("/actions/resume", data={"token": TOKEN})
    assert c.get("/api/status").json()["paused"] is False
    assert [e.actor for e in seeded.events(lineage.PAUSE_EVENT)] == ["dashboard@testclient"]


@pytest.mark.slow  # a real `kaizen dashboard` process: imports torch, so tens of seconds on 2 cores
def test_kaizen_dashboard_serves_the_lineage_with_the_token_from_the_environment(seeded: Seeded) -> None:
    import os
    import subprocess
    import sys
    import time

    import httpx

    from ops.screenshot_dashboard import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")} | {"KAIZEN_DASHBOARD__TOKEN": TOKEN}
    command = [sys.executable, "-m", "daemon.cli", "dashboard", "--data-dir", str(seeded.settings.data_dir), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status = httpx.get(f"{base}/api/status", timeout=2).json()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() is not None else "no answer"
                time.sleep(0.2)
        assert status["champion"] == seeded.champion()
        target = seeded.promotable()
        promoted = httpx.post(f"{base}/actions/promote", json={"checkpoint": target}, headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"})
        assert promoted.status_code == 200 and seeded.champion() == target
    finally:
        server.terminate()
        server.wait(timeout=20)
