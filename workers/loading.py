"""The model runtime for a checkpoint under the configured settings (device, CPU threads, engine),
after verifying a kaizen checkpoint against its manifest; and a prompt as one user chat turn. Shared
by the stages and by the evaluation suites."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers import artifacts
from workers.runtime import ModelRuntime, configure_cpu_threads
from workers.runtime_cache import get_runtime

if TYPE_CHECKING:
    from daemon.config import Settings


def load_runtime(settings: Settings, checkpoint_path: str) -> ModelRuntime:
    """The process's runtime for a checkpoint, on the configured device and CPU threads."""
    configure_cpu_threads(settings.model.cpu_threads)
    # A checkpoint kaizen wrote is verified against its manifest (and fetched if remote) first;
    # model.device, model.prompt_format and model.context_length shape the runtime and its profile.
    return get_runtime(artifacts.model_path_for_loading(settings, checkpoint_path), **settings.model.runtime_options())


def load_sampler(settings: Settings, checkpoint_path: str) -> ModelRuntime:
    """The runtime that samples and scores a checkpoint on the configured engine (model.engine):
    :func:`load_runtime` for hf; for vllm the process's vLLM engine (workers/vllm_engine.py, the
    kaizen[vllm] extra), which imports vllm only here. Training always uses :func:`load_runtime`."""
    if settings.model.engine != "vllm":
        return load_runtime(settings, checkpoint_path)
    from workers.vllm_engine import get_vllm_runtime

    configure_cpu_threads(settings.model.cpu_threads)
    return get_vllm_runtime(
        artifacts.model_path_for_loading(settings, checkpoint_path), **settings.model.runtime_options(),
        kv_cache_gib=settings.model.vllm_kv_cache_gib,
    )


def user_prompt(runtime: ModelRuntime, content: str, max_new_tokens: int | None = None) -> str:
    """One user turn in the model's prompt format; URIAL drops examples to leave room for ``max_new_tokens``."""
    return runtime.render_chat([{"role": "user", "content": content}], max_new_tokens=max_new_tokens)
