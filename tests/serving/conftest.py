"""Fixtures of the serving tests: a deployment of the tiny model behind the real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.bootstrap import initialise
from tests.serving.harness import Server, serve_settings


@pytest.fixture()
def deployment(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    settings = serve_settings(tmp_path, tiny_model_dir)
    sessions = initialise(settings)
    with Server(settings) as server:
        yield settings, sessions, server
