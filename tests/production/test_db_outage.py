"""The lineage DB's PostgreSQL server is stopped for 60 s while a worker runs dpo_update, then
started again: the same `kaizen run` process survives (it waits with capped, jittered backoff and
logs the outage once) and finishes the cycle, with nothing lost or duplicated.

The server is this test's own (initdb on a free port, tests/production/harness.PrivatePostgres);
the machine's shared PostgreSQL is never stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from daemon.db.engine import make_engine, make_session_factory
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
