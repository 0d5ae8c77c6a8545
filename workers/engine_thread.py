"""The thread and request queue of a server decoding loop, shared by the HF engine
(:class:`workers.batch_engine.BatchEngine`) and the vLLM one
(:class:`workers.vllm_batch_engine.VllmBatchEngine`).

Any thread may submit sequences, queue calls and retire the engine; only the engine's own thread
touches the model. Each turn of :meth:`EngineThread._loop` takes the waiting sequences that fit,
runs the queued calls, then hands the admitted sequences to the subclass's :meth:`_serve` (admit,
step, evict). What :meth:`_serve` raises goes to :meth:`_fail`, which reports the error to the
sequences it concerns, and the loop goes on: one bad batch must not kill the server.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, Self, TypeVar

import structlog

log = structlog.get_logger(__name__)


class QueueFullError(RuntimeError):
    """The engine holds as many waiting sequences as it may; retry later."""


class Cancellable(Protocol):
    cancelled: threading.Event


RequestT = TypeVar("RequestT", bound=Cancellable)


class EngineThread(ABC, Generic[RequestT]):
    """The queue of waiting sequences and of calls, and the thread that serves them.

    Subclasses admit, step and evict: :meth:`_serve`, :meth:`_fail` and :attr:`running`."""

    thread_prefix = "engine"  # the thread is named f"{thread_prefix}-{name}"

    def __init__(self, *, max_batch_size: int, max_waiting: int, name: str, admit_min: int = 1) -> None:
        """``admit_min``: while sequences are running, waiting ones join only once at least this
        many slots are free (or every waiting one fits)."""
        self.max_batch_size, self.max_waiting, self.name = max_batch_size, max_waiting, name
        self.admit_min = max(1, min(admit_min, max_batch_size))
        self.stats = {"steps": 0, "tokens": 0, "admitted": 0, "finished": 0, "cancelled": 0}
        self._waiting: deque[RequestT] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._retired = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop, name=f"{self.thread_prefix}-{self.name}", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: RequestT) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} sequences are already waiting (serve.max_queue)")
            self._waiting.append(request)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between two decode steps (the model is not shared)."""
        future: Future[Any] = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def retire(self) -> None:
        """Finish what was submitted, then stop the thread (a newer model took over)."""
        with self._cond:
            self._retired = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the engine thread to end (after :meth:`retire`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    @abstractmethod
    def running(self) -> int:
        """How many sequences are decoding."""

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread

    @abstractmethod
    def _serve(self, admitted: list[RequestT]) -> None:
        """One turn on the model: drop what ended or was cancelled, admit ``admitted``, step."""

    @abstractmethod
    def _fail(self, exc: BaseException, admitted: list[RequestT]) -> None:
        """:meth:`_serve` raised ``exc``: end every running sequence and those of ``admitted``
        that never joined with ``on_error``, and leave the engine empty."""

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.running and not self._waiting and not self._calls:
                    if self._retired:
                        log.info("serve.engine_retired", engine=self.name)
                        return
                    self._cond.wait(timeout=1.0)
                admitted = self._take_waiting()
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                _run_call(fn, future)
            try:
                self._serve(admitted)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the server
                log.exception("serve.engine_failed", engine=self.name, error=str(exc))
                self._fail(exc, admitted)

    def _take_waiting(self) -> list[RequestT]:
        room = self.max_batch_size - self.running
        if self.running and room < min(self.admit_min, len(self._waiting)):
            return []
        taken = []
        while self._waiting and len(taken) < room:
            request = self._waiting.popleft()
            if request.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            taken.append(request)
        return taken


def _run_call(fn: Callable[[], Any], future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        future.set_exception(exc)
