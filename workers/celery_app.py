"""The Celery app and its one task: run a stage of an iteration.

The message is only a trigger; the lineage DB holds the stage's state and result, so a
redelivered message finds the stage done and returns the stored result (see stage_runner).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from daemon.config import Settings, load_settings
from daemon.db.engine import make_engine, make_session_factory
from workers.broker import EMBEDDED_TRANSPORT
from workers.stage_runner import StageContext, execute_stage
from workers.stages import STAGE_QUEUES, STAGES

TASK_NAME = "kaizen.run_stage"


def make_celery(settings: Settings) -> Celery:
    app = Celery("kaizen", broker=settings.resolved_broker_url)
    app.conf.update(
        task_acks_late=True,
        # A worker killed mid-task (OOM, kill -9) must not ack the message: it is redelivered.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="cpu",
        task_routes={TASK_NAME: {"queue": "gpu"}},
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME, bind=True)(_run_stage_task)
    return app


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.resolved_broker_url.startswith(("sqla+", f"{EMBEDDED_TRANSPORT}+")):
        # kombu's SQLAlchemy transport hands every transport option to create_engine(), which
        # rejects unknown keywords; it has no visibility timeout (a message is deleted on fetch).
        # Daemon and worker share the SQLite file: wait on its lock instead of failing at once.
        return {"connect_args": {"timeout": 30}}
    # Redis hands an unacked message to another worker after visibility_timeout: it must exceed
    # the longest stage or an hours-long DPO run would be started twice.
    return {"visibility_timeout": int(settings.worker.stage_timeout_seconds * 1.5), "polling_interval": 0.2}


@lru_cache(maxsize=1)
def _worker_sessions(database_url: str):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(database_url))


@worker_process_init.connect
def _fresh_engine_after_fork(**_: Any) -> None:
    # A connection pool must never cross a fork.
    _worker_sessions.cache_clear()


def _run_stage_task(task: Any, iteration_id: int, stage: str) -> dict[str, Any]:
    settings = load_settings()
    ctx = StageContext(settings=settings, sessions=_worker_sessions(settings.resolved_database_url), iteration_id=iteration_id)
    return execute_stage(ctx, stage, STAGES[stage])


def queue_for(stage: str) -> str:
    return STAGE_QUEUES[stage]


app = make_celery(load_settings())
