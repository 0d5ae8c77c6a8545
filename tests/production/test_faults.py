"""Fault tests against the real services and processes: each ends with the lineage checked for
nothing lost and nothing duplicated (tests/production/harness.py assert_lineage_exact).

How each fault is survived:

* worker killed during dpo_update — the pool process alone: Celery's parent sees it die and,
  with ``task_reject_on_worker_lost``, requeues the message at once; the new pool process finds
  the dead one's lease, waits until it expires and takes the stage over. The whole worker
  (parent and pool, like a lost machine): the message stays unacked in Redis until the
  visibility timeout (hours in production), so the daemon notices the expired lease and sends
  the stage again; a fresh worker takes it over.
* daemon killed mid-cycle — the worker finishes the stage it holds; the restarted daemon finds
  the running iteration and resumes it at its first unfinished stage.
* Redis restarted (no persistence: queued and unacked messages are gone) — the daemon sends a
  stage nobody claimed again; worker and daemon reconnect on their own.
* two daemons — the second waits as standby on the leader lock and resumes the leader's
  iteration when the leader is killed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import Iteration, StageRun
from tests.production.harness import (
    PrivateRedis, Processes, assert_lineage_exact, lineage_queue_of, production_config, spawn_daemon, spawn_worker, stage_running, succeeded_stages,
    wait_for,
)
from daemon.stage_specs import CORE_STAGES

pytestmark = pytest.mark.slow

# Long enough to be caught in the act on a loaded 2-core machine, short enough for CI.
LONGER_TRAINING = {"training": {"max_steps": 12, "batch_size": 2, "max_length": 128}}


def _sessions(url: str):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(url))


def _attempts(sessions) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return dict(session.execute(select(StageRun.stage, StageRun.attempts)).all())


def _config_dict(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())


@pytest.mark.parametrize("victim", ["pool_process", "whole_worker"])
def test_kill_9_of_the_worker_during_dpo_update_redelivers_and_yields_one_candidate(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes, victim: str
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url, **LONGER_TRAINING)
    sessions = _sessions(pg_url)
    worker = processes.add(spawn_worker(config))
    daemon = processes.add(spawn_daemon(config, cycles=1))

    holder = wait_for(lambda: stage_running(sessions, "dpo_update"), 300, "a worker to start dpo_update", interval=0.05)
    if victim == "pool_process":
        (pool_pid,) = worker.children()
        os.kill(pool_pid, signal.SIGKILL)
    else:
        worker.kill9()
        processes.add(spawn_worker(config, name="worker-2"))

    assert daemon.wait(timeout=400) == 0, processes.logs()
    assert_lineage_exact(sessions, _config_dict(config), tmp_path / "data", iterations=1)
    attempts = _attempts(sessions)
    assert attempts["dpo_update"] == 2, "killed once, then taken over once"
    assert all(attempts[s] == 1 for s in CORE_STAGES if s != "dpo_update")
    with sessions() as session:
        dpo = session.scalars(select(StageRun).where(StageRun.stage == "dpo_update")).one()
        assert dpo.worker_id != holder.worker_id
    if victim == "pool_process":
        assert "WorkerLostError" in worker.log()  # Celery itself requeued the message
    else:
        assert any("expired" in e.get("reason", "") for e in daemon.events() if e.get("event") == "stage.redispatch")


def test_a_daemon_killed_mid_cycle_resumes_at_the_unfinished_stage_when_restarted(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url)
    sessions = _sessions(pg_url)
    processes.add(spawn_worker(config))
    first = processes.add(spawn_daemon(config, name="daemon-1", cycles=1))
    wait_for(lambda: "respond" in succeeded_stages(sessions), 300, "the cycle to get past respond", interval=0.05)

    first.kill9()
    done_before_restart = succeeded_stages(sessions)
    second = processes.add(spawn_daemon(config, name="daemon-2", cycles=1))

    assert second.wait(timeout=400) == 0, processes.logs()
    started = [e for e in second.events() if e.get("event") == "cycle.started"]
    assert len(started) == 1 and started[0]["resumed"] is True
    assert started[0]["resume_at"] not in done_before_restart and started[0]["resume_at"] != "generate_prompts"
    assert {"generate_prompts", "respond"} <= done_before_restart
    assert_lineage_exact(sessions, _config_dict(config), tmp_path / "data", iterations=1)
    assert set(_attempts(sessions).values()) == {1}, "no stage computed twice"


def test_redis_restarted_mid_cycle_daemon_and_worker_reconnect_and_finish(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, private_redis: PrivateRedis, processes: Processes
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, private_redis.url, **LONGER_TRAINING)
    sessions = _sessions(pg_url)
    daemon = processes.add(spawn_daemon(config, cycles=1))
    # No worker yet: the first stage's message waits in Redis ...
    gpu_queue = wait_for(lambda: lineage_queue_of(sessions, "gpu"), 120, "the daemon to migrate the lineage DB", interval=0.05)
    wait_for(lambda: private_redis.client().llen(gpu_queue) > 0, 120, "the daemon to queue generate_prompts", interval=0.05)
    # ... and is lost with it.
    private_redis.restart()
    assert private_redis.client().llen(gpu_queue) == 0
    processes.add(spawn_worker(config))
    # Then Redis goes away again while the worker trains.
    wait_for(lambda: stage_running(sessions, "dpo_update"), 300, "the worker to start dpo_update", interval=0.05)
    private_redis.restart()

    assert daemon.wait(timeout=400) == 0, processes.logs()
    assert_lineage_exact(sessions, _config_dict(config), tmp_path / "data", iterations=1)
    assert daemon.has_event("stage.redispatch", stage="generate_prompts")
    assert set(_attempts(sessions).values()) == {1}, "no stage computed twice"


def test_two_daemons_at_once_run_one_cycle_at_a_time_and_the_standby_takes_over(
    tmp_path: Path, tiny_model_dir: Path, pg_url: str, redis_url: str, processes: Processes
) -> None:
    config = production_config(tmp_path, tiny_model_dir, pg_url, redis_url)
    sessions = _sessions(pg_url)
    processes.add(spawn_worker(config))
    daemons = [processes.add(spawn_daemon(config, name=f"daemon-{n}", cycles=1)) for n in ("a", "b")]

    leader = wait_for(lambda: next((d for d in daemons if d.has_event("leader.acquired")), None), 120, "a leader")
    standby = next(d for d in daemons if d is not leader)
    wait_for(lambda: standby.has_event("leader.standby"), 60, "the other daemon to stand by")
    wait_for(lambda: "generate_prompts" in succeeded_stages(sessions), 300, "the leader's cycle to get going", interval=0.05)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Iteration)) == 1
    assert not standby.has_event("cycle.started"), "a standby never runs a cycle"

    leader.kill9()

    assert standby.wait(timeout=400) == 0, processes.logs()
    assert standby.has_event("leader.acquired", took_over=True)
    started = [e for e in standby.events() if e.get("event") == "cycle.started"]
    assert len(started) == 1 and started[0]["resumed"] is True
    assert_lineage_exact(sessions, _config_dict(config), tmp_path / "data", iterations=1)
    assert set(_attempts(sessions).values()) == {1}, "no stage computed twice"
