"""Concurrent requests share decode steps; dropped streams free their slot; health never waits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from daemon.bootstrap import initialise
from tests.serving.harness import Server, openai_client, serve_settings

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _deploy(tmp_path: Path, model_dir: Path, **serve):  # type: ignore[no-untyped-def]
    settings = serve_settings(tmp_path, model_dir, **serve)
    initialise(settings)
    return Server(settings)


def _engine(server: Server):  # type: ignore[no-untyped-def]
    engines = server.app.state.serving.engines()
    assert len(engines) == 1
    return engines[0]


def test_eight_concurrent_clients_are_decoded_in_one_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=8) as server:
        client = openai_client(server)
        start = threading.Barrier(8)

        def ask(seed: int) -> str:
            start.wait()
            reply = client.chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=24, seed=seed)
            return reply.choices[0].finish_reason

        with ThreadPoolExecutor(8) as pool:
            finishes = list(pool.map(ask, range(8)))
        assert all(f in {"stop", "length"} for f in finishes)
        steps = list(_engine(server).step_log)
        assert max(steps) > 1, f"every decode step had one sequence: {steps}"


def test_a_dropped_stream_frees_its_slot(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=1, max_new_tokens=2000) as server:
        body = {"model": "kaizen", "messages": MESSAGES, "max_tokens": 2000, "stream": True, "logit_bias": {"2": -100}}  # 2: EOS, never ends early
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    break  # the client goes away after its first token
        engine = _engine(server)
        deadline = time.monotonic() + 30
        while engine.stats["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats["cancelled"] == 1 and engine.running == 0
        # The only slot is free again: the next request is served, and the dropped one stopped early.
        reply = openai_client(server).chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=3)
        assert reply.usage.completion_tokens == 3
        assert engine.stats["tokens"] < 1000


def test_healthz_answers_while_64_requests_are_queued(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=1, max_queue=128) as server:
        body = {"model": "kaizen", "messages": MESSAGES, "max_tokens": 24}

        def ask(_: int) -> int:
            return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=300).status_code

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(ask, i) for i in range(64)]
            engine_seen = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                engines = server.app.state.serving.engines()
                if engines and engines[0].waiting >= 32:
                    engine_seen = engines[0]
                    break
                time.sleep(0.01)
            assert engine_seen is not None, "the requests never queued up"
            health = httpx.get(f"{server.base}/healthz", timeout=30).json()
            # Answered while generations were still queued behind the one running sequence.
            assert health["status"] == "ok" and health["waiting"] > 0
            assert not all(f.done() for f in futures)
            assert [f.result() for f in futures] == [200] * 64
