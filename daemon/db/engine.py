"""Engines and sessions for the lineage DB, and migrations to head."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import migrations

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN; a read-then-write transaction would then
    # fail with SQLITE_BUSY regardless of busy_timeout. Emit BEGIN IMMEDIATE ourselves instead.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def open_lineage(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the configured lineage DB (no migration: `kaizen init` does that)."""
    return make_session_factory(make_engine(settings.resolved_database_url))


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def dry_run(factory: sessionmaker[Session], change: Callable[[Session], object]) -> None:
    """Run ``change`` in a transaction and roll it back: whatever it would refuse is raised, nothing is kept.

    Lets a slow check that must stay outside any transaction (hashing a checkpoint) come after
    the cheap refusals (unknown id, rejected checkpoint, nothing to roll back to).
    """
    with factory() as session, session.begin():
        change(session)
        session.rollback()


T = TypeVar("T")


def retry_while_unreachable(fn: Callable[[], T], what: str, limit_seconds: float, first_delay: float = 0.5, cap: float = 30.0) -> T:
    """``fn()``, retried while the database is unreachable (a restart, a network blip).

    Capped exponential backoff with full jitter, so a fleet of daemons and workers does not
    reconnect in lockstep; one warning when the outage starts and one line when it ends. Re-raises
    once the outage has lasted ``limit_seconds``. Other errors are not retried.
    """
    started: float | None = None
    delay = first_delay
    while True:
        try:
            value = fn()
        except (OperationalError, InterfaceError) as exc:
            now = time.monotonic()
            if started is None:
                started = now
                log.warning("db.unreachable", during=what, error=str(exc).splitlines()[0], retrying_for_seconds=limit_seconds)
            if now - started >= limit_seconds:
                raise
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, cap)
            continue
        if started is not None:
            log.info("db.reachable_again", during=what, outage_seconds=round(time.monotonic() - started, 1))
        return value


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
