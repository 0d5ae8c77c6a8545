"""`kaizen serve`: the current champion behind an OpenAI-compatible API (see app.py)."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI

from daemon.config import Settings


def build_app(settings: Settings) -> FastAPI:
    from daemon.db.engine import open_lineage
    from daemon.serving.app import create_serving_app
    from daemon.serving.champion import ChampionWatcher, load_verified
    from workers.runtime import configure_cpu_threads
    from workers.steering import SteeringMethods, SteeringResources

    # The server holds a model like any worker: model.cpu_threads applies here too (torch's
    # default of one thread per core was ~11x slower on a loaded machine).
    configure_cpu_threads(settings.model.cpu_threads)

    device = None if settings.model.device == "auto" else settings.model.device
    sessions = open_lineage(settings)
    loader = partial(load_verified, settings, device=device)
    watcher = ChampionWatcher(sessions, loader=loader, poll_seconds=settings.serve.poll_seconds)
    methods = SteeringMethods(SteeringResources(settings.serve, sessions, loader), settings.serve.default_steering)
    return create_serving_app(settings, watcher, methods)
