"""The local worker dies with the daemon that started it.

`kaizen run` in local mode starts its Celery worker as a child in a process group of its own, with
``KAIZEN_OWNER_PID`` set to the daemon's pid. Without this, a daemon killed with ``kill -9`` or
SIGTERM left its worker running with parent pid 1. After a restart, that orphan went on taking
stages while the new daemon's own worker sat idle. Two mechanisms, because either one alone has
a gap:

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the worker's main process and in each pool process:
  the kernel kills the process the moment its parent dies. (Linux only; the signal fires when the
  parent *thread* that forked it exits, which for the daemon is a long-lived thread.)
* A watchdog thread in the worker's main process. Every half second it checks that its parent is
  still the owner pid. If not (the owner died before PDEATHSIG was set, or the platform has no
  prctl), it SIGKILLs its whole process group: the main process and every pool process.

A stage cut short this way is taken over once its lease expires, like any other dead worker's.
External workers (`kaizen worker`) have no owner and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading

import structlog

log = structlog.get_logger(__name__)

OWNER_ENV = "KAIZEN_OWNER_PID"
PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5


def owner_pid() -> int | None:
    value = os.environ.get(OWNER_ENV, "")
    return int(value) if value.isdigit() else None


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False where prctl is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _owner_gone(owner: int) -> None:
    log.error("worker.owner_gone", owner_pid=owner, action="killing this worker's process group")
    os.killpg(os.getpgrp(), signal.SIGKILL)


def watch_owner(owner: int) -> threading.Thread:
    """Kill this process group once the parent is no longer ``owner`` (it died; we were re-parented)."""

    def watch() -> None:
        while os.getppid() == owner:
            threading.Event().wait(WATCH_SECONDS)
        _owner_gone(owner)

    thread = threading.Thread(target=watch, name="owner-watchdog", daemon=True)
    thread.start()
    return thread


def bind_worker_to_owner() -> None:
    """In the worker's main process: die with the owner daemon, if there is one."""
    owner = owner_pid()
    if owner is None:
        return
    die_with_parent()
    if os.getppid() != owner:  # died before the kernel was told
        _owner_gone(owner)
    watch_owner(owner)
    log.info("worker.bound_to_owner", owner_pid=owner)


def bind_pool_process_to_worker() -> None:
    """In a pool process of an owned worker: die with the worker's main process."""
    if owner_pid() is not None:
        die_with_parent()
