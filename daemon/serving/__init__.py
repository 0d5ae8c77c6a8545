"""`kaizen serve`: the current champion behind an OpenAI-compatible API (see app.py)."""

from __future__ import annotations

import threading
import time
from functools import partial

from fastapi import FastAPI

from daemon.config import Settings


def build_app(settings: Settings) -> FastAPI:
    from daemon.db.engine import open_lineage
    from daemon.serving.app import create_serving_app
    from daemon.serving.champion import ChampionWatcher, VllmChampionLoader, load_verified
    from workers.runtime import configure_cpu_threads
    from workers.steering import SteeringMethods, SteeringResources

    # The server holds a model like any worker: model.cpu_threads applies here too (torch's
    # default of one thread per core was ~11x slower on a loaded machine).
    configure_cpu_threads(settings.model.cpu_threads)
    sessions = open_lineage(settings)
    loader = partial(load_verified, settings)  # also the steering methods' reward models: HF runtimes
    champion_loader = VllmChampionLoader(settings) if settings.model.engine == "vllm" else loader
    watcher = ChampionWatcher(sessions, loader=champion_loader, poll_seconds=settings.serve.poll_seconds)
    methods = SteeringMethods(SteeringResources(settings.serve, sessions, loader), settings.serve.default_steering)
    return create_serving_app(settings, watcher, methods)


class ServerThread:
    """``kaizen serve``'s app on a loopback port in a background thread (tests, benchmarks).

    ``with ServerThread(settings) as server:`` returns once the server accepts connections;
    ``server.base`` is its URL and ``server.app`` the app (its ``state.serving`` holds the engines).
    """

    def __init__(self, settings: Settings, *, start_timeout: float = 60) -> None:
        """``start_timeout``: seconds to wait for the server, which loads the champion first."""
        import uvicorn

        self.app = build_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.serve.port, log_config=None))
        self.thread = threading.Thread(target=self.server.run, name="kaizen-serve", daemon=True)
        self.base = f"http://127.0.0.1:{settings.serve.port}"
        self.start_timeout = start_timeout

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.base} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

