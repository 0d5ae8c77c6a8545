"""The README's main job, end to end: `kaizen run --cycles 2` with a local Celery worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import small_cycle_config
from daemon.stage_specs import CORE_STAGES

pytestmark = pytest.mark.slow


def _kaizen(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def _small_config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    config = small_cycle_config(
        tmp_path / "data", tiny_model_dir, log_format="json", worker={"mode": "local"},
        schedule={"interval_seconds": 1, "max_consecutive_failures": 2},
    )
    path = tmp_path / "kaizen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_daemon_runs_two_cycles_on_a_local_celery_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _small_config(tmp_path, tiny_model_dir)

    run = _kaizen("run", "--config", str(config), "--cycles", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]

    listing = _kaizen("lineage", "--config", str(config), "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    view = json.loads(listing.stdout)
    iterations = view["iterations"]
    assert [it["status"] for it in iterations] == ["completed", "completed"]
    for it in iterations:
        assert set(it["stages"]) == set(CORE_STAGES)
        assert all(stage["status"] == "succeeded" and stage["seconds"] > 0 for stage in it["stages"].values())
        assert it["pairs"]["pairs"] == it["pairs"]["self_reward_pairs"] + it["pairs"]["rlcd_pairs"] > 0
        assert it["decision"] in {"promoted", "rejected"}
        assert it["gate"] is not None and it["gate"]["promote"] == (it["decision"] == "promoted")
    assert view["champion"] in {c["id"] for c in view["checkpoints"]}
    # The stages ran in the worker process, not in the daemon.
    worker_log = (tmp_path / "data" / "worker.log").read_text()
    assert worker_log.count("stage.succeeded") == 2 * len(CORE_STAGES)


def test_daemon_gives_up_with_a_clear_error_when_cycles_keep_failing(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _small_config(tmp_path, tiny_model_dir)
    # A broker that refuses connections: every dispatch fails, nothing is left half-written.
    text = config.read_text().replace("mode: local", "mode: external\n  broker_url: redis://127.0.0.1:1/0")
    config.write_text(text)

    run = _kaizen("run", "--config", str(config), "--cycles", "1", cwd=tmp_path, timeout=180)

    assert run.returncode == 1
    assert "the daemon stopped: 2 cycles failed in a row" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_truncated_broker_db_is_moved_aside_and_the_cycle_completes(tmp_path: Path, tiny_model_dir: Path) -> None:
    import sqlite3

    config = _small_config(tmp_path, tiny_model_dir)
    broker = tmp_path / "data" / "broker.db"
    broker.parent.mkdir(parents=True)
    with sqlite3.connect(broker) as db:  # a broker DB with content, then cut in half as a crash might
        db.execute("CREATE TABLE kombu_message (id INTEGER PRIMARY KEY, payload TEXT)")
        db.executemany("INSERT INTO kombu_message (payload) VALUES (?)", [("m" * 300,)] * 200)
    broker.write_bytes(broker.read_bytes()[: broker.stat().st_size // 2])

    run = _kaizen("run", "--config", str(config), "--cycles", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert any(json.loads(line).get("event") == "broker.recreated" for line in run.stderr.splitlines() if line.startswith("{"))
    assert [p.name for p in broker.parent.glob("broker.db.damaged-*")]
    listing = json.loads(_kaizen("lineage", "--config", str(config), "--json", cwd=tmp_path).stdout)
    assert [it["status"] for it in listing["iterations"]] == ["completed"]
