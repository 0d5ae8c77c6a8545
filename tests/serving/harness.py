"""The real server on a loopback port for the serving tests, and the openai client to call it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import openai
import uvicorn

from daemon.config import load_settings
from daemon.serving import build_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        self.app = build_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.serve.port, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{settings.serve.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_settings(tmp_path: Path, model_dir: Path, **serve: Any):  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        data_dir=str(tmp_path / "data"),
        model={"path": str(model_dir)},
        serve={"port": free_port(), "poll_seconds": 0.1, "max_new_tokens": 24,
               "genarm": {"reward_models": {"same": {"path": str(model_dir)}}}, **serve},
    )


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)
