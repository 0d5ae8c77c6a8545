from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest



@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No test may pick up a developer's kaizen.yaml or KAIZEN_* variables.
    import os

    for key in list(os.environ):
        if key.startswith("KAIZEN_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policies.self_instruct import load_seed_prompts
    from workers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", extra_corpus=load_seed_prompts())


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train and decode tiny models with one intra-op thread, as the stages do (model.cpu_threads: 1).

    Tiny models gain nothing from more threads, and on a loaded 2-core machine two threads made
    training 20-100x slower (the results are bit-identical either way).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def stop_listener() -> Iterator[object]:
    """This process listens for the worker-shutdown stop request as a pool process does; yields the signal."""
    import signal

    from workers.graceful_stop import STOP_SIGNAL, listen_for_stop_requests

    listen_for_stop_requests()
    yield STOP_SIGNAL
    signal.signal(STOP_SIGNAL, signal.SIG_DFL)
    listen_for_stop_requests()  # no request left for the next test
