"""`kaizen run` in local mode killed with SIGKILL or SIGTERM while its worker computes a stage
leaves no worker process behind: the Celery main process and its pool process are gone, checked
by pid (workers/owner.py). SIGTERM is a graceful stop: exit 0 and a `daemon.stopped` line that
says which iteration and stage the next start resumes."""

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
