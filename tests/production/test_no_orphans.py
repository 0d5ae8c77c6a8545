"""`kaizen run` in local mode killed with SIGKILL or SIGTERM while its worker computes a stage
leaves no worker process behind: the Celery main process and its pool process are gone, checked
by pid (workers/owner.py). SIGTERM is a graceful stop: exit 0 and a `daemon.stopped` line that
says which iteration and stage the next start resumes; it stops the worker warmly, so a DPO run
saves its trainer state and the next `kaizen run` resumes it (daemon.dispatch.LocalWorker.stop)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from daemon.db.engine import make_engine, make_session_factory
from daemon.db.models import StageRun, StageStatus
from tests.factories import small_cycle_config
from tests.production.harness import Processes, spawn_daemon, wait_for
from workers.checkpoints import read_manifest

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = task / "children"
            if children.exists():
                for child in map(int, children.read_text().split()):
                    if child not in found:
                        found.add(child)
                        pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


def _a_stage_is_held(sessions) -> bool:  # type: ignore[no-untyped-def]
    try:
        with sessions() as session:
            return session.scalars(select(StageRun).where(StageRun.status == StageStatus.running, StageRun.worker_id.is_not(None))).first() is not None
    except OperationalError:  # the daemon has not created the tables yet
        return False


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killing_kaizen_run_leaves_no_local_worker_behind(
    tmp_path: Path, tiny_model_dir: Path, processes: Processes, signal_name: str
) -> None:
    config = tmp_path / "kaizen.yaml"
    settings = small_cycle_config(tmp_path / "data", tiny_model_dir, log_format="json", worker={"mode": "local"},
                                  training={"max_steps": 40})
    config.write_text(yaml.safe_dump(settings))
    daemon = processes.add(spawn_daemon(config))
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'data' / 'lineage.db'}"))
    wait_for(lambda: _a_stage_is_held(sessions), 240, "the local worker to hold a stage", interval=0.2)
    worker = _descendants(daemon.pid)
    assert len(worker) >= 2, worker  # the Celery main process and its pool process

    os.kill(daemon.pid, getattr(signal, signal_name))  # the daemon alone, not its process group
    code = daemon.popen.wait(timeout=90)
    wait_for(lambda: not any(_alive(pid) for pid in worker), 30, f"worker pids {sorted(worker)} to exit")
    if signal_name == "SIGTERM":  # a graceful stop: an exit line naming what the next start resumes
        assert code == 0, daemon.log()[-3000:]
        stopped = [e for e in daemon.events() if e.get("event") == "daemon.stopped"]
        assert stopped and stopped[0]["signal"] == "SIGTERM" and stopped[0]["resumes"].startswith("iteration 1 at "), stopped
    else:
        assert code == -signal.SIGKILL


def _saved_steps(state_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in state_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def _events(log_path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]


def test_sigterm_to_kaizen_run_mid_dpo_saves_the_trainer_state_and_the_next_run_resumes_it(
    tmp_path: Path, tiny_model_dir: Path, processes: Processes
) -> None:
    """SIGTERM reaches the local worker's main process first (a warm shutdown), so its pool process
    saves the DPO trainer state and hands the stage over before the worker's group is killed; the
    next `kaizen run` resumes from that step, and neither run leaves a worker process behind."""
    data = tmp_path / "data"
    config = tmp_path / "kaizen.yaml"
    config.write_text(yaml.safe_dump(small_cycle_config(data, tiny_model_dir, log_format="json", worker={"mode": "local"},
                                                        training={"max_steps": 40, "save_steps": 2})))
    sessions = make_session_factory(make_engine(f"sqlite:///{data / 'lineage.db'}"))
    state_dir = data / "artifacts" / "checkpoints" / ".trainer-state-ckpt-0001"

    first = processes.add(spawn_daemon(config))
    wait_for(lambda: _saved_steps(state_dir), 300, "dpo_update's first periodic save", interval=0.05)
    first_worker = _descendants(first.pid)
    assert len(first_worker) >= 2, first_worker  # the Celery main process and its pool process
    os.kill(first.pid, signal.SIGTERM)  # the daemon alone
    assert first.popen.wait(timeout=120) == 0, first.log()[-3000:]
    wait_for(lambda: not any(_alive(pid) for pid in first_worker), 30, f"worker pids {sorted(first_worker)} to exit")

    worker_events = _events(data / "worker.log")
    stopped = [e for e in worker_events if e.get("event") == "training.stopped_for_shutdown"]
    assert len(stopped) == 1, stopped  # the handed-back message is not started again by the stopping worker
    stopped = stopped[0]
    assert 0 < stopped["saved_step"] < 40 and _saved_steps(state_dir) == [stopped["saved_step"]]
    assert [e.get("stage") for e in worker_events if e.get("event") == "stage.handed_over"] == ["dpo_update"]
    with sessions() as session:
        dpo = session.scalars(select(StageRun).where(StageRun.stage == "dpo_update")).one()
        assert dpo.status == StageStatus.pending and dpo.attempts == 0  # handed over, not a failed attempt

    second = processes.add(spawn_daemon(config, name="daemon-2"))
    assert second.popen.wait(timeout=400) == 0, second.log()[-3000:]
    manifest = read_manifest(data / "artifacts" / "checkpoints" / "ckpt-0001").metadata
    assert manifest["resumed_from_step"] == stopped["saved_step"]  # the trainer's global_step at resume
    assert any(e.get("event") == "training.resumed" and e.get("from_step") == stopped["saved_step"] for e in _events(data / "worker.log"))
    with sessions() as session:
        dpo = session.scalars(select(StageRun).where(StageRun.stage == "dpo_update")).one()
        assert dpo.status == StageStatus.succeeded and dpo.attempts == 1
    second_worker = {int(dpo.worker_id.split(":")[1])}  # the pool process that trained
    second_worker |= {e["pid"] for e in second.events() if e.get("event") == "worker.started"}  # its Celery main process
    assert len(second_worker) >= 2, second_worker
    wait_for(lambda: not any(_alive(pid) for pid in second_worker), 30, f"worker pids {sorted(second_worker)} to exit")
    assert not state_dir.exists()
