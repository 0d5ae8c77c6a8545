"""The process-wide runtime cache: each worker loads a model once and keeps the most recent two.

A worker that switches champions must not keep every old model in memory, so the cache is an LRU
(``KAIZEN_RUNTIME_CACHE_SIZE``, default :data:`RUNTIME_CACHE_SIZE`). Entries are keyed by the
resolved path and the newest file time in it, so a checkpoint rewritten in place is reloaded.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from pathlib import Path

import structlog
import torch

from workers.runtime import ModelRuntime, default_device

log = structlog.get_logger(__name__)

RUNTIME_CACHE_SIZE = 2
"""How many models one worker process keeps loaded (most recently used first)."""

_CacheKey = tuple[str, str, str, int, str, "int | None"]
_cache: OrderedDict[_CacheKey, ModelRuntime] = OrderedDict()
_cache_lock = threading.Lock()


def cache_key(model_path: str, device: str | None, dtype: str, prompt_format: str, context_length: int | None) -> _CacheKey:
    path = Path(model_path).expanduser()
    if path.exists():
        resolved = path.resolve()
        # A checkpoint directory rewritten in place must not be served from the stale cache entry.
        try:
            stamp = max((f.stat().st_mtime_ns for f in resolved.iterdir() if f.is_file()), default=0)
        except OSError:
            stamp = 0
        return str(resolved), device or default_device(), dtype, stamp, prompt_format, context_length
    return model_path, device or default_device(), dtype, 0, prompt_format, context_length  # a hub id


def get_runtime(
    model_path: str, *, device: str | None = None, dtype: str = "auto", prompt_format: str = "auto", context_length: int | None = None
) -> ModelRuntime:
    """The process's runtime for ``model_path``: loaded on first use, reused afterwards (LRU of size 2)."""
    key = cache_key(str(model_path), device, dtype, prompt_format, context_length)
    with _cache_lock:
        runtime = _cache.get(key)
        if runtime is not None:
            _cache.move_to_end(key)
            return runtime
        runtime = ModelRuntime.load(key[0], device=key[1], dtype=dtype, prompt_format=prompt_format, context_length=context_length)
        _cache[key] = runtime
        evicted = False
        while len(_cache) > max(1, _cache_size()):
            old_key, _ = _cache.popitem(last=False)
            log.info("model_evicted", model_path=old_key[0], device=old_key[1])
            evicted = True
        if evicted:
            release_memory()
        return runtime


def cached_runtime_paths() -> list[str]:
    """Paths of the cached runtimes, least recently used first."""
    with _cache_lock:
        return [key[0] for key in _cache]


def clear_runtime_cache() -> None:
    with _cache_lock:
        _cache.clear()
    release_memory()


def _cache_size() -> int:
    return int(os.environ.get("KAIZEN_RUNTIME_CACHE_SIZE", RUNTIME_CACHE_SIZE))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
