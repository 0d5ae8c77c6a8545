"""Fixtures of the production-mode tests: real PostgreSQL, real Redis, real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from daemon.db.engine import make_engine, make_session_factory
from tests.production.harness import PrivatePostgres, PrivateRedis, Processes, RedisForTests, scratch_database


@pytest.fixture()
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture()
def pg_sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()  # DROP DATABASE needs every connection gone


@pytest.fixture(scope="session")
def test_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisForTests]:
    # One redis-server for the session (or KAIZEN_TEST_REDIS_URL): never the machine's shared one.
    services = RedisForTests(tmp_path_factory.mktemp("redis"))
    yield services
    services.close()


@pytest.fixture()
def redis_url(test_redis: RedisForTests) -> Iterator[str]:
    with test_redis.scratch_db() as url:
        yield url


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture()
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, which the test may stop and restart."""
    server = PrivatePostgres(tmp_path / "postgres")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture()
def processes(request: pytest.FixtureRequest) -> Iterator[Processes]:
    started = Processes()
    yield started
    started.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(started.logs())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Lets the `processes` fixture print the daemons' and workers' logs when a test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
