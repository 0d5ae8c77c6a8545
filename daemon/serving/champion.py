"""The served model follows the lineage DB's champion pointer.

A background thread polls the pointer. When it changes (a promotion, a rollback), the new
checkpoint is verified and loaded beside the old one, then swapped in with one reference
assignment: a request holds the :class:`ServedModel` it started with, so requests in flight finish
on the old model, and the old model is freed when the last of them lets go. A checkpoint that fails
to load is remembered and not retried until the pointer moves again; the old model keeps serving
and the error is reported on ``/healthz``. Every swap hashes the checkpoint's files against its
manifest (workers.trust), so bit rot that keeps sizes and mtimes is refused too. A fresh server
whose champion fails serves the newest earlier champion that verifies, and ``/healthz`` says so
under ``fallback``; the next pointer move that loads ends the fallback.

Under ``model.engine: vllm`` the loader is a :class:`VllmChampionLoader`: a process runs one vLLM
engine, and a new champion whose LoRA adapter was trained on the engine's model (the usual
promotion: a candidate of the served champion), or whose lineage adapter is rooted at it (a
candidate of a candidate, up to ``model.vllm_max_stacked_adapters`` in a row), is hot-loaded into
it as an adapter instead of restarting the engine on the merged weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.db import lineage
from daemon.db.models import Checkpoint
from daemon.config import Settings
from workers.runtime import ModelRuntime

if TYPE_CHECKING:
    from workers.lora_training import AdapterRecord
    from workers.vllm_engine import VllmRuntime

log = structlog.get_logger(__name__)

Loader = Callable[[str], ModelRuntime]


@dataclass(frozen=True)
class ServedModel:
    checkpoint_id: str
    path: str
    runtime: ModelRuntime
    loaded_at: float


@dataclass(frozen=True)
class SwapFailure:
    checkpoint_id: str
    error: str
    at: float


@dataclass(frozen=True)
class Fallback:
    """Serving an earlier champion because the champion itself failed to load (fresh server only)."""

    serving: str
    champion: str
    reason: str


def load_verified(settings: Settings, path: str) -> ModelRuntime:
    """Load a checkpoint for serving (model.device, prompt_format, context_length, serve.dtype),
    fetched if remote, after hashing every file against its manifest: at every swap, never
    trusting a memo (bit rot keeps sizes and mtimes)."""
    from workers.trust import verify_before_trust

    return ModelRuntime.load(verify_before_trust(settings, path), dtype=settings.serve.dtype, **settings.model.runtime_options())


def _same_directory(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def stacked_lora_rank(settings: Settings) -> int:
    """The LoRA rank a serving vLLM engine starts with: room for ``model.vllm_max_stacked_adapters``
    of the trainers' adapters stacked into one lineage adapter, within vLLM's largest rank."""
    from workers.vllm_engine import LORA_RANKS

    trained = max(settings.training.lora_r, settings.steerlm.lora_r)
    return max(trained, min(trained * settings.model.vllm_max_stacked_adapters, LORA_RANKS[-1]))


def adapter_on_engine(checkpoint: str, engine_model: str, max_lora_rank: int) -> AdapterRecord | None:
    """The adapter that serves the local ``checkpoint`` on an engine running ``engine_model`` with
    ``max_lora_rank``: the checkpoint's own when it was trained on that model, else its lineage
    adapter when the lineage is rooted there; None when neither applies or fits (a restart)."""
    from workers.lora_training import checkpoint_adapter, checkpoint_lineage_adapter

    for record in (checkpoint_adapter(checkpoint), checkpoint_lineage_adapter(checkpoint)):
        if record is not None and _same_directory(record.base, engine_model) and record.rank <= max_lora_rank:
            return record
    return None


class VllmChampionLoader:
    """The champion on the process's vLLM engine (``model.engine: vllm``), after the same full
    verification as :func:`load_verified`.

    The engine runs the model it was started on (its ``base``) with LoRA enabled up to
    :func:`stacked_lora_rank`. A checkpoint is then served as: that model itself (a rollback to
    it); the engine's model plus an adapter (:func:`adapter_on_engine`: the checkpoint's own when
    trained on that model, else its lineage adapter rooted there, workers.lora_training), loaded
    into the running engine under a name and id of its own (workers.vllm_engine.lora_adapter);
    otherwise a new engine on the checkpoint's merged weights, which stops the running one
    (sequences still decoding there end with an error). That happens past
    ``model.vllm_max_stacked_adapters`` promotions in a row (the checkpoint then starts a new
    lineage, and the promotions after it hot-load again), and for a champion of another branch
    or from before the engine's model.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base: VllmRuntime | None = None  # the runtime that owns the running engine
        self.max_lora_rank = stacked_lora_rank(settings)

    def __call__(self, path: str) -> ModelRuntime:
        from workers.trust import is_hub_id, verify_before_trust
        from workers.vllm_engine import VllmRuntime, lora_adapter

        local = verify_before_trust(self.settings, path)
        base = self.base
        if base is not None and base.llm is not None:
            if _same_directory(local, base.model_path):
                return base
            # The engine's own limit: vLLM rounds max_lora_rank up to a rank it takes.
            record = None if is_hub_id(local) else adapter_on_engine(local, base.model_path, base.engine_options.get("max_lora_rank", 0))
            if record is not None:
                started = time.perf_counter()
                view = base.with_adapter(lora_adapter(record.path))
                view.load_adapter()
                log.info("serve.adapter_hot_loaded", path=local, adapter=view.adapter.name if view.adapter else None,
                         base=base.model_path, stacked=record.depth, rank=record.rank, load_seconds=round(time.perf_counter() - started, 3))
                return view
        runtime = VllmRuntime.load(
            local, **self.settings.model.runtime_options(), kv_cache_gib=self.settings.model.vllm_kv_cache_gib, max_lora_rank=self.max_lora_rank,
        )
        self.base = runtime
        return runtime


class ChampionWatcher:
    def __init__(self, sessions: sessionmaker[Session], *, loader: Loader, poll_seconds: float = 1.0) -> None:
        self.sessions = sessions
        self.loader = loader
        self.poll_seconds = poll_seconds
        self.current: ServedModel | None = None
        self.last_failure: SwapFailure | None = None
        self.fallback: Fallback | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    def _pointer(self) -> tuple[str, str] | None:
        with self.sessions() as session:
            champion = lineage.current_champion(session)
            return (champion.id, champion.path) if champion else None

    def refresh(self) -> bool:
        """Check the pointer once; load and swap if it moved. True when a new model was swapped in."""
        with self._refresh_lock:
            pointer = self._pointer()
            if pointer is None:
                return False
            checkpoint_id, path = pointer
            if self.current is not None and self.current.checkpoint_id == checkpoint_id:
                return False
            if self.last_failure is not None and self.last_failure.checkpoint_id == checkpoint_id:
                return False
            if self._swap_to(checkpoint_id, path):
                self.fallback = None
                return True
            if self.current is None:  # a fresh server: serve something verified rather than nothing
                return self._fall_back(checkpoint_id)
            return False

    def _earlier_champions(self, champion_id: str) -> list[tuple[str, str]]:
        """The champions before ``champion_id``, newest first, with their paths."""
        with self.sessions() as session:
            history = [c for c in reversed(lineage.champion_history(session)) if c != champion_id]
            paths = {c.id: c.path for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(history)))}
        return [(c, paths[c]) for c in dict.fromkeys(history) if c in paths]

    def _fall_back(self, champion_id: str) -> bool:
        failure = self.last_failure
        for checkpoint_id, path in self._earlier_champions(champion_id):
            if self._swap_to(checkpoint_id, path, keep_failure=True):
                self.fallback = Fallback(checkpoint_id, champion_id, failure.error if failure else "failed to load")
                log.error("serve.fallback", serving=checkpoint_id, champion=champion_id, reason=self.fallback.reason)
                return True
        return False

    def _swap_to(self, checkpoint_id: str, path: str, *, keep_failure: bool = False) -> bool:
        """Load and swap in; ``keep_failure``: a fallback load, which must not forget why the champion failed."""
        previous = self.current.checkpoint_id if self.current else None
        started = time.perf_counter()
        try:
            runtime = self.loader(path)
        except Exception as exc:  # noqa: BLE001 - any load failure must leave the old model serving
            error = f"{type(exc).__name__}: {exc}"
            if not keep_failure:
                self.last_failure = SwapFailure(checkpoint_id, error, time.time())
            log.error("serve.swap_failed", checkpoint_id=checkpoint_id, path=path, error=error, still_serving=previous)
            return False
        self.current = ServedModel(checkpoint_id, path, runtime, time.time())
        if not keep_failure:
            self.last_failure = None
        log.info("serve.swapped", checkpoint_id=checkpoint_id, previous=previous, load_seconds=round(time.perf_counter() - started, 3))
        return True

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="champion-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill the watcher
                log.warning("serve.pointer_check_failed", error=str(exc))
