"""The model runtime for a checkpoint under the configured settings (device, CPU threads), after
verifying a kaizen checkpoint against its manifest; and a prompt as one user chat turn. Shared by
the stages and by the evaluation suites."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers import artifacts
from workers.runtime import ModelRuntime, configure_cpu_threads, get_runtime

if TYPE_CHECKING:
    from daemon.config import Settings


def load_runtime(settings: Settings, checkpoint_path: str) -> ModelRuntime:
    """The process's runtime for a checkpoint, on the configured device and CPU threads."""
    configure_cpu_threads(settings.model.cpu_threads)
    device = None if settings.model.device == "auto" else settings.model.device
    # A checkpoint kaizen wrote is verified against its manifest (and fetched if remote) first.
    return get_runtime(artifacts.model_path_for_loading(settings, checkpoint_path), device=device)


def user_prompt(runtime: ModelRuntime, content: str) -> str:
    return runtime.render_chat([{"role": "user", "content": content}])
