"""The real server on a loopback port for the serving tests, and the openai client to call it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import openai

from daemon.config import load_settings
from daemon.serving import ServerThread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Server = ServerThread


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
