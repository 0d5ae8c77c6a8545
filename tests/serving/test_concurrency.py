"""Concurrent requests share decode steps; dropped streams free their slot; health never waits."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

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


def _running_engine(server: Server):  # type: ignore[no-untyped-def]
    """The engine, once a sequence is decoding on it (within 30 s)."""
    engine = None
    deadline = time.monotonic() + 30
    while (engine is None or engine.running < 1) and time.monotonic() < deadline:
        engines = server.app.state.serving.engines()
        engine = engines[0] if engines else None
        time.sleep(0.01)
    assert engine is not None and engine.running >= 1, "no sequence started decoding"
    return engine


def _assert_slot_freed(server: Server, engine) -> None:  # type: ignore[no-untyped-def]
    """The abandoned request was cancelled, and the only slot serves the next request at once."""
    deadline = time.monotonic() + 30
    while engine.stats["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == 1 and engine.running == 0
    reply = openai_client(server).chat.completions.create(model="kaizen", messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert engine.stats["tokens"] < 1000  # the abandoned one (2000 tokens asked) stopped early


def test_a_dropped_stream_frees_its_slot(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=1, max_new_tokens=2000) as server:
        body = {"model": "kaizen", "messages": MESSAGES, "max_tokens": 2000, "stream": True, "logit_bias": {"2": -100}}  # 2: EOS, never ends early
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    break  # the client goes away after its first token
        _assert_slot_freed(server, _engine(server))


def test_a_non_streamed_request_whose_client_leaves_frees_its_slot(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=1, max_new_tokens=2000) as server:
        body = json.dumps({"model": "kaizen", "messages": MESSAGES, "max_tokens": 2000, "logit_bias": {"2": -100}}).encode()  # 2: EOS
        url = urlsplit(server.base)
        # A raw connection, so the test closes it exactly while the request is decoding.
        with socket.create_connection((url.hostname, url.port), timeout=30) as connection:
            connection.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            engine = _running_engine(server)
        _assert_slot_freed(server, engine)


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


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path, tiny_model_dir: Path) -> None:
    with _deploy(tmp_path, tiny_model_dir, max_batch_size=1, max_queue=1, max_new_tokens=2000) as server:
        long = {"model": "kaizen", "messages": MESSAGES, "max_tokens": 2000, "logit_bias": {"2": -100}}  # 2: EOS
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, f"{server.base}/v1/chat/completions", json=long, timeout=300)
            engine = _running_engine(server)
            deadline = time.monotonic() + 30
            waiting = pool.submit(httpx.post, f"{server.base}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=300)
            while engine.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = httpx.post(f"{server.base}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "server_overloaded"
            assert running.result().status_code == 200 and waiting.result().status_code == 200


def test_the_server_runs_with_model_cpu_threads(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch picks on a 2-core machine; the server must lower it
    try:
        settings = serve_settings(tmp_path, tiny_model_dir)
        settings.model.cpu_threads = 1
        initialise(settings)
        with Server(settings):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
