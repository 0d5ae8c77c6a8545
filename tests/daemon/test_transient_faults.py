"""Transient faults: an unreachable DB is retried with backoff and logged once per outage; a
failed cycle backs off exponentially before the next attempt."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from daemon.db.engine import retry_while_unreachable


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "answer"


def test_an_outage_is_retried_until_the_db_answers_and_logged_once_at_each_end() -> None:
    flaky = Flaky(failures=4)
    with capture_logs() as logs:
        assert retry_while_unreachable(flaky, "reading", limit_seconds=30, first_delay=0.01, cap=0.02) == "answer"
    assert flaky.calls == 5
    assert [e["event"] for e in logs] == ["db.unreachable", "db.reachable_again"]


def test_an_outage_longer_than_the_limit_is_raised() -> None:
    with pytest.raises(OperationalError):
        retry_while_unreachable(Flaky(failures=10**6), "reading", limit_seconds=0.05, first_delay=0.01, cap=0.01)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        retry_while_unreachable(broken, "reading", limit_seconds=30)
    assert calls == [1]


def test_a_failed_cycle_backs_off_exponentially_and_giving_up_is_an_event(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from daemon.config import load_settings
    from daemon.db import lineage
    from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
    from daemon.db.models import Event
    from daemon.scheduler import GAVE_UP_EVENT, Daemon
    from tests.factories import stand_in_checkpoint

    settings = load_settings(None, data_dir=str(tmp_path / "data"), schedule={"interval_seconds": 2, "max_consecutive_failures": 2})
    upgrade_to_head(settings.resolved_database_url)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path=stand_in_checkpoint(tmp_path / "m"), base_model="tiny", actor="test")

    class Failing:
        calls = 0

        def run_stage(self, iteration_id: int, stage: str) -> dict:
            Failing.calls += 1
            raise RuntimeError("worker unreachable")

    daemon = Daemon(settings, sessions, Failing(), max_cycles=1)
    daemon._tick()
    assert Failing.calls == 1 and daemon._backing_off()
    daemon._tick()  # within the 2 s back-off: no attempt
    assert Failing.calls == 1
    daemon._retry_at = 0.0  # the back-off has passed
    daemon._tick()
    assert Failing.calls == 2 and daemon.gave_up and "2 cycles failed in a row" in daemon.gave_up
    with sessions() as session:
        assert [e.reason for e in session.scalars(select(Event).where(Event.kind == GAVE_UP_EVENT))] == [daemon.gave_up]
