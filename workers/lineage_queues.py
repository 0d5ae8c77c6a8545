"""Celery queues of one lineage: named after its uuid, so lineages can share one broker.

A stage message goes to ``kaizen.<lineage uuid>.<gpu|cpu>`` and carries the uuid. A worker is
started with the logical names (``-Q gpu,cpu``); at start it reads the uuid of the lineage DB
it was configured for and consumes that lineage's queues only, so a worker of another lineage
on the same Redis DB never even receives (let alone acks away) a message that is not its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from daemon.db.engine import make_engine, make_session_factory
from daemon.db.lineage import lineage_uuid

log = structlog.get_logger(__name__)

QUEUE_PREFIX = "kaizen"


def lineage_queue(lineage_id: str, queue: str) -> str:
    """The broker queue of logical ``queue`` (gpu, cpu) in lineage ``lineage_id``."""
    return f"{QUEUE_PREFIX}.{lineage_id}.{queue}"


def read_lineage_uuid(database_url: str) -> str | None:
    """The lineage's uuid, or None while the DB is not initialised (no file, no table, no row)."""
    if database_url.startswith("sqlite") and not Path(database_url.split("///", 1)[-1]).exists():
        return None  # opening it would create an empty file that `kaizen init` did not make
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return lineage_uuid(session)
    except SQLAlchemyError:
        return None  # not migrated yet, or not reachable yet: both mean "wait"
    finally:
        engine.dispose()  # the worker forks its pool next: no connection may cross the fork


def wait_for_lineage_uuid(database_url: str, poll_seconds: float = 1.0, log_every_seconds: float = 30.0) -> str:
    """Block until the lineage DB has its uuid: a worker may start before `kaizen init` or `run`."""
    last_logged = -log_every_seconds
    started = time.monotonic()
    while (found := read_lineage_uuid(database_url)) is None:
        if time.monotonic() - last_logged >= log_every_seconds:
            log.warning("worker.waiting_for_lineage", reason="the lineage DB has no lineage id yet; run `kaizen init` or `kaizen run`")
            last_logged = time.monotonic()
        time.sleep(poll_seconds)
    if time.monotonic() - started > poll_seconds:
        log.info("worker.lineage_found", lineage_id=found)
    return found


def consume_lineage_queues(queues: Any, lineage_id: str) -> list[str]:
    """Swap the selected logical queues (Celery's ``app.amqp.queues``) for the lineage's own."""
    logical = list(queues.consume_from)
    for name in logical:
        # queues[name] declares it as `-Q name` would (its own exchange), the same way a publisher does.
        queues.select_add(queues[lineage_queue(lineage_id, name)])
    queues.deselect(logical)
    return sorted(queues.consume_from)
