"""The lineage DB's PostgreSQL server is stopped for 60 s while a worker runs dpo_update, then
started again: the same `kaizen run` process survives (it waits with capped, jittered backoff and
logs the outage once) and finishes the cycle, with nothing lost or duplicated. Stopped as a tick
starts, the tick's first DB calls wait it out the same way.

The server is this test's own (initdb on a free port, tests/production/harness.PrivatePostgres);
the machine's shared PostgreSQL is never stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from structlog.testing import capture_logs

from daemon.config import load_settings
from daemon.cycle import run_cycle
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Iteration, IterationStatus
from daemon.scheduler import Daemon
from daemon.stage_specs import stages_for
from tests.factories import stand_in_checkpoint
from tests.production.harness import (
    PrivatePostgres, Processes, assert_lineage_consistent, assert_lineage_exact, production_config, scratch_database, spawn_daemon,
    spawn_worker, stage_running, wait_for,
)

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 60


def test_a_postgres_outage_mid_stage_is_survived_by_the_same_daemon_process(
    tmp_path: Path, tiny_model_dir: Path, private_postgres: PrivatePostgres, redis_url: str, processes: Processes
) -> None:
    with scratch_database(private_postgres.url) as db_url:
        config = production_config(
            tmp_path, tiny_model_dir, db_url, redis_url, training={"max_steps": 12, "batch_size": 2, "max_length": 128},
            schedule={"db_outage_seconds": 300},
        )
        processes.add(spawn_worker(config))
        daemon = processes.add(spawn_daemon(config))
        engine = make_engine(db_url)
        wait_for(lambda: stage_running(make_session_factory(engine), "dpo_update"), 300, "dpo_update to be running", interval=0.1)
        engine.dispose()

        private_postgres.stop("fast")
        time.sleep(OUTAGE_SECONDS)
        assert daemon.alive(), daemon.log()[-3000:]
        private_postgres.start()

        assert daemon.wait(timeout=420) == 0, daemon.log()[-4000:]
        assert daemon.has_event("db.unreachable") and daemon.has_event("db.reachable_again")
        unreachable = [e for e in daemon.events() if e.get("event") == "db.unreachable"]
        assert len(unreachable) <= 3, unreachable  # once per outage and call site, not once per retry
        engine = make_engine(db_url)
        sessions = make_session_factory(engine)
        assert_lineage_exact(sessions, yaml.safe_load(config.read_text()), tmp_path / "data", iterations=1)
        assert_lineage_consistent(sessions)
        engine.dispose()


# ---------------------------------------------------------------- the start of a tick


class RecordingDispatcher:
    """Runs no model: records which stages the cycle asked for (the DB calls are what is tested)."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def run_stage(self, iteration_id: int, stage: str) -> dict:
        self.stages.append(stage)
        return {}


def _lineage_on(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = load_settings(None, data_dir=str(tmp_path / "data"), database_url=db_url, schedule={"db_outage_seconds": 300})
    upgrade_to_head(db_url)
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path=stand_in_checkpoint(tmp_path / "m"), base_model="tiny", actor="test")
    return settings, sessions, engine


def _through_an_outage(server: PrivatePostgres, call: Callable[[], object], logs: list[dict]) -> None:
    """Stop the server, start ``call``, let it meet the outage, start the server, wait for ``call``."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    server.stop("fast")
    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: any(e["event"] == "db.unreachable" for e in logs) or not thread.is_alive(), 60, "the call to meet the outage")
    assert thread.is_alive() and not failures, failures  # waiting for the DB, not failed
    server.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and not failures, failures


@pytest.mark.parametrize("entry", ["daemon tick", "kaizen cycle"])
def test_a_postgres_outage_at_the_start_of_a_tick_is_waited_out_and_the_cycle_runs(
    tmp_path: Path, private_postgres: PrivatePostgres, entry: str
) -> None:
    with scratch_database(private_postgres.url) as db_url:
        settings, sessions, engine = _lineage_on(db_url, tmp_path)
        dispatcher = RecordingDispatcher()
        if entry == "daemon tick":  # its first DB call reads the pause state
            call, during = Daemon(settings, sessions, dispatcher)._tick, "reading the pause state"
        else:  # run_cycle's first one starts the iteration
            call, during = (lambda: run_cycle(sessions, settings, dispatcher)), "starting the iteration"
        with capture_logs() as logs:
            _through_an_outage(private_postgres, call, logs)

        outage = [(e["event"], e.get("during")) for e in logs if e["event"].startswith("db.")]
        assert outage == [("db.unreachable", during), ("db.reachable_again", during)]  # once at each end
        assert dispatcher.stages == list(stages_for(settings))
        with sessions() as session:
            assert [i.status for i in session.scalars(select(Iteration))] == [IterationStatus.completed]
        engine.dispose()
