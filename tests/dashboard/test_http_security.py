"""Hostile clients against the dashboard: foreign Host headers, framing, token guessing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from daemon.config import load_settings
from daemon.dashboard import create_dashboard_app
from daemon.http_security import FailureLimiter, allowed_hosts, secret_matches, unauthenticated_bind_problem

from .conftest import TOKEN, Seeded, seed


def _client(seeded: Seeded, host: str = "127.0.0.1") -> TestClient:
    return TestClient(create_dashboard_app(seeded.settings, seeded.sessions), base_url=f"http://{host}")


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost", "[::1]:8765"])
def test_loopback_host_headers_are_answered(seeded: Seeded, host: str) -> None:
    response = _client(seeded).get("/api/status", headers={"host": host})
    assert response.status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8765", "10.1.2.3"])
def test_a_foreign_host_header_is_refused_on_pages_json_and_actions(seeded: Seeded, host: str) -> None:
    client = _client(seeded)
    for method, path in (("get", "/"), ("get", "/api/iterations/1"), ("get", "/metrics"), ("post", "/actions/pause")):
        response = getattr(client, method)(path, headers={"host": host, "authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 400, (path, response.status_code)
    assert client.get("/api/status").json()["paused"] is False  # the rebinding POST changed nothing


def test_configured_allowed_hosts_replace_the_loopback_default(tmp_path: Path) -> None:
    seeded = seed(tmp_path, iterations=2)
    seeded.settings.dashboard.allowed_hosts = ["kaizen.internal"]
    client = _client(seeded, "kaizen.internal")
    assert client.get("/api/status").status_code == 200
    assert client.get("/api/status", headers={"host": "127.0.0.1"}).status_code == 400


def test_every_page_forbids_being_framed(seeded: Seeded) -> None:
    client = _client(seeded)
    for path in ("/", "/iterations/1", "/api/status", "/metrics"):
        response = client.get(path)
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert response.headers["x-frame-options"] == "DENY"


def test_token_guessing_is_rate_limited_and_the_right_token_waits_too(seeded: Seeded) -> None:
    client = _client(seeded)
    limit = FailureLimiter().max_failures
    for guess in range(limit):
        refused = client.post("/actions/pause", data={"token": f"guess-{guess}"}, headers={"accept": "application/json"})
        assert refused.status_code == 401
    blocked = client.post("/actions/pause", data={"token": TOKEN}, headers={"accept": "application/json"})
    assert blocked.status_code == 429 and "too many wrong tokens" in blocked.json()["error"]
    assert client.get("/api/status").json()["paused"] is False


def test_the_right_token_still_works_below_the_limit(seeded: Seeded) -> None:
    client = _client(seeded)
    client.post("/actions/pause", data={"token": "wrong"}, headers={"accept": "application/json"})
    done = client.post("/actions/pause", data={"token": TOKEN}, headers={"accept": "application/json"})
    assert done.status_code == 200 and client.get("/api/status").json()["paused"] is True


def test_secret_comparison() -> None:
    assert secret_matches("k-123", SecretStr("k-123"))
    assert not secret_matches("k-124", SecretStr("k-123"))
    assert not secret_matches("", SecretStr(""))
    assert not secret_matches("anything", None)


def test_allowed_hosts_default_is_loopback_plus_a_specific_bind_address() -> None:
    assert allowed_hosts(None, "127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts(None, "0.0.0.0") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts(None, "192.168.1.5")[-1] == "192.168.1.5"
    assert allowed_hosts(["*"], "0.0.0.0") == ["*"]


def test_serving_without_an_api_key_on_a_public_address_needs_an_explicit_opt_in() -> None:
    assert unauthenticated_bind_problem("127.0.0.1", None, False) is None
    assert unauthenticated_bind_problem("::1", None, False) is None
    problem = unauthenticated_bind_problem("0.0.0.0", None, False)
    assert problem is not None and "serve.api_key" in problem and "serve.allow_unauthenticated" in problem
    assert unauthenticated_bind_problem("0.0.0.0", SecretStr(""), False) is not None
    assert unauthenticated_bind_problem("0.0.0.0", SecretStr("k"), False) is None
    assert unauthenticated_bind_problem("0.0.0.0", None, True) is None


def test_kaizen_serve_refuses_a_public_bind_without_a_key(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from daemon.cli import app
    from daemon.logs import configure_logging

    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0"])
    configure_logging()  # the CLI bound the logs to the runner's stream, closed now
    assert result.exit_code == 1 and "refusing to serve on 0.0.0.0 without an API key" in result.output
    settings = load_settings(None, data_dir=str(tmp_path), serve={"api_key": "k"})
    assert unauthenticated_bind_problem("0.0.0.0", settings.serve.api_key, settings.serve.allow_unauthenticated) is None
