"""A warm shutdown (SIGTERM to the Celery worker) saves a running trainer's state before exiting.

Celery's warm shutdown waits for the running stage, however long: a six-hour DPO run would keep
the worker for hours, and a kill past the grace period (systemd's TimeoutStopSec, docker's
stop_grace_period) lost everything since the last ``training.save_steps``. Instead:

* the worker's main process, told to shut down (Celery's ``worker_shutting_down``), sends
  ``STOP_SIGNAL`` to its pool processes (SIGTERM stays Celery's own: billiard uses it to end
  pool processes, and our deploy files send it to the main process only, ``KillMode=mixed``);
* a pool process that is training notes the request; the trainer's callback
  (workers.lora_training) saves its state at the end of the current step and stops, and the
  stage hands itself over (daemon.stage_runs.StageInterrupted): its message goes back to the
  queue and the next worker resumes from the saved step;
* a pool process running any other stage ignores the request: that stage finishes, as a warm
  shutdown intends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable

import structlog

log = structlog.get_logger(__name__)

STOP_SIGNAL = signal.SIGUSR2
_stop_requested = threading.Event()


def stop_requested() -> bool:
    """True once this process was asked to stop training (and save its state first)."""
    return _stop_requested.is_set()


def _note_stop_request(_signum: int, _frame: object) -> None:
    _stop_requested.set()


def listen_for_stop_requests() -> None:
    """In a pool process: STOP_SIGNAL asks a running trainer to save and stop (else it is a no-op).
    A request is never withdrawn: Celery's warm shutdown cannot be cancelled, so this process takes
    no further stage; a process starts listening with no request."""
    _stop_requested.clear()
    signal.signal(STOP_SIGNAL, _note_stop_request)


def keep_listening_for_stop_requests() -> None:
    """In a pool process, as a stage starts: make sure STOP_SIGNAL is still ours (a pending request stays).

    A threaded billiard pool (a broker without an asynchronous transport: the embedded SQLite one
    of `kaizen run`'s local mode, ``sqla+``) resets every terminating signal, STOP_SIGNAL included,
    to its own exit handler *after* the process initializer ran; a stop request then killed the
    pool process mid-step (exit code 70) instead of saving. Before a stage starts the handler is
    put back; an idle process asked to stop still just exits, which a shutdown wants anyway."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(STOP_SIGNAL) is not _note_stop_request:
        signal.signal(STOP_SIGNAL, _note_stop_request)


def ask_pool_to_stop(pids: Iterable[int]) -> None:
    """In the worker's main process, at shutdown: ask each pool process to save and stop its training."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, STOP_SIGNAL)
            log.info("worker.stop_requested", pool_pid=pid, signal=STOP_SIGNAL.name)

