"""The Celery app and its one task: run a stage of an iteration.

The message is only a trigger; the lineage DB holds the stage's state and result, so a
redelivered message finds the stage done and returns the stored result (see stage_runner).

Worker settings for hours-long GPU stages, and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only after the
  stage ran; a pool process killed mid-stage (OOM, ``kill -9``) makes the worker requeue it.
* ``worker_prefetch_multiplier = 1``: a worker reserves one stage at a time, so a second GPU
  worker can take the next one instead of it waiting behind a six-hour DPO run.
* Redis ``visibility_timeout`` = 1.5 x ``worker.stage_timeout_seconds``: Redis hands an unacked
  message to another worker once it is this old. It must outlast the longest stage, or a healthy
  DPO run would be started a second time while it is still training (the lease in the lineage
  DB would turn that second start into a wait, but it would occupy a GPU worker for nothing).
  A worker that died is noticed much sooner through its expired lease: the daemon re-sends the
  stage (daemon/dispatch.py), so recovery does not wait for the visibility timeout.
* ``worker_cancel_long_running_tasks_on_connection_loss = False``: a Redis restart must not
  abort hours of training; the stage commits to the lineage DB, and a lost ack only means the
  message may come again, which the stored result answers.
* One model-holding process per GPU: this module and the worker's parent process never import
  torch (the stages are imported inside the task, in the pool process), so no CUDA context can
  exist before the fork. Run one ``kaizen worker -Q gpu --concurrency 1`` per GPU.
* Queues per lineage (workers/lineage_queues.py): ``-Q gpu`` consumes ``kaizen.<lineage uuid>.gpu``
  of the lineage DB the worker is configured for, and every message carries that uuid; a message
  of another lineage that reaches a worker anyway is sent on to its own lineage's queue, unclaimed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import structlog
from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_init, worker_shutting_down

from daemon.config import EMBEDDED_TRANSPORT, Settings, load_settings
from daemon.db.engine import make_engine, make_session_factory
from daemon.db.lineage import lineage_uuid
from daemon.logs import configure_logging
import workers.broker  # noqa: F401  (registers the embedded broker's kombu transport)
from daemon.stage_runner import execute_stage
from daemon.stage_runs import StageContext, StageDeliveryDropped, StageInterrupted
from workers.graceful_stop import ask_pool_to_stop, keep_listening_for_stop_requests, listen_for_stop_requests, stop_requested
from workers.lineage_queues import consume_lineage_queues, lineage_queue, wait_for_lineage_uuid
from workers.owner import bind_pool_process_to_worker, bind_worker_to_owner

TASK_NAME = "kaizen.run_stage"

log = structlog.get_logger(__name__)

# The lineage this worker process serves: set at worker start, inherited by the forked pool.
_served_lineage: str | None = None
# The worker (Celery's WorkController) in its main process, for its pool's pids at shutdown.
_worker: Any = None


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
        # Keep reconnecting to a restarted broker for as long as it takes.
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_soft_shutdown_timeout=settings.worker.soft_shutdown_seconds,
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
    # the longest stage or an hours-long DPO run would be started twice (see the module docstring).
    return {"visibility_timeout": int(settings.worker.stage_timeout_seconds * 1.5), "polling_interval": 0.2}


@lru_cache(maxsize=1)
def _worker_sessions(database_url: str):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(database_url))


@worker_init.connect
def _configure_worker_logging(**_: Any) -> None:
    # In the worker's main process only (the daemon imports this module too); forked pool
    # processes inherit it.
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    bind_worker_to_owner()  # a local worker dies with its daemon (workers/owner.py)


@worker_init.connect
def _consume_this_lineages_queues(sender: Any, **_: Any) -> None:
    # Before the pool forks and the consumer starts: the worker only ever sees its lineage's messages.
    global _served_lineage, _worker
    _worker = sender
    _served_lineage = wait_for_lineage_uuid(load_settings().resolved_database_url)
    queues = consume_lineage_queues(sender.app.amqp.queues, _served_lineage)
    log.info("worker.lineage", lineage_id=_served_lineage, queues=queues)


@worker_process_init.connect
def _fresh_engine_after_fork(**_: Any) -> None:
    # A connection pool must never cross a fork.
    _worker_sessions.cache_clear()
    bind_pool_process_to_worker()
    listen_for_stop_requests()  # a warm shutdown saves a running trainer's state first (workers/graceful_stop.py)


@worker_shutting_down.connect
def _save_training_before_exit(**_: Any) -> None:
    pool = getattr(_worker, "pool", None)
    if pool is not None:
        ask_pool_to_stop(pool.info.get("processes", []))


def _run_stage_task(
    task: Any, iteration_id: int, stage: str, input_hash: str | None = None, lineage_id: str | None = None
) -> dict[str, Any]:
    from daemon.stage_specs import stage_function  # the stage's code is imported here, in the pool process: the parent never loads torch

    keep_listening_for_stop_requests()  # a warm shutdown makes a trainer save and hand over, on any broker
    if stop_requested():
        # This worker is shutting down and its consumer has not stopped yet: a message it just
        # handed back came round again. Starting it would claim (count an attempt), reload the
        # models and train one more step before handing over again; leave it to the next worker.
        log.info("stage.not_started", iteration_id=iteration_id, stage=stage, reason="the worker is shutting down")
        raise Reject("the worker is shutting down", requeue=True)
    settings = load_settings()
    ctx = StageContext(settings=settings, sessions=_worker_sessions(settings.resolved_database_url), iteration_id=iteration_id)
    with ctx.sessions() as session:
        refusal = _foreign_lineage(lineage_id, lineage_uuid(session))  # read at each claim: the DB may have been reset
    if refusal:
        return _refuse(task, iteration_id, stage, input_hash, lineage_id, refusal)
    delivery = task.request.delivery_info or {}
    try:
        return execute_stage(ctx, stage, stage_function(stage), expected_input_hash=input_hash)
    except StageInterrupted as exc:
        # Back to the queue unclaimed: the next worker resumes the stage from its saved state.
        raise Reject(str(exc), requeue=True) from exc
    except StageDeliveryDropped as exc:
        # Acknowledged without computing: the lineage DB already has (or will get) this stage.
        log.warning("stage.delivery_dropped", iteration_id=iteration_id, stage=stage, reason=str(exc),
                    redelivered=bool(delivery.get("redelivered")))
        return {"dropped": str(exc)}


def _foreign_lineage(message_lineage: str | None, db_lineage: str | None) -> str | None:
    """Why this worker must not claim a message, if it must not: it is not of the worker's lineage DB."""
    if message_lineage is None:
        return "the message names no lineage"
    if message_lineage != db_lineage:
        return f"the message is for lineage {message_lineage}; this worker's lineage DB is {db_lineage}"
    return None


def _refuse(task: Any, iteration_id: int, stage: str, input_hash: str | None, lineage_id: str | None, reason: str) -> dict[str, Any]:
    """Leave the stage unclaimed. A message of another lineage goes on to that lineage's own queue,
    where its workers take it: acking it here must not take it away from its owner."""
    owner_queue = lineage_queue(lineage_id, queue_for(stage)) if lineage_id and lineage_id != _served_lineage else None
    log.error("stage.foreign_lineage", iteration_id=iteration_id, stage=stage, reason=reason, served_lineage=_served_lineage,
              forwarded_to=owner_queue)
    if owner_queue and lineage_id:
        publish_stage(task.app, lineage_id, iteration_id, stage, input_hash)
    return {"refused": reason}


def publish_stage(app: Celery, lineage_id: str, iteration_id: int, stage: str, input_hash: str | None) -> None:
    """Send a stage to the workers of lineage ``lineage_id``: its own queue, its uuid in the message."""
    app.send_task(
        TASK_NAME, args=[iteration_id, stage, input_hash], kwargs={"lineage_id": lineage_id},
        queue=lineage_queue(lineage_id, queue_for(stage)),
    )


def queue_for(stage: str) -> str:
    from daemon.stage_specs import STAGE_QUEUES

    return STAGE_QUEUES[stage]


app = make_celery(load_settings())
