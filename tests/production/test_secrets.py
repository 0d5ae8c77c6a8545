"""Secrets never leave: the serve API key, the dashboard token and the passwords in the database,
broker and openai judge URLs appear in no lineage row, log line, file of the data dir, CLI output
or dashboard page/JSON after a real cycle (a `kaizen cycle` process, configured through the
environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from daemon.config import load_settings
from daemon.dashboard import create_dashboard_app
from daemon.db.engine import make_engine, make_session_factory
from tests.factories import small_cycle_config
from tests.production.harness import REPO

pytestmark = pytest.mark.slow


def _kaizen(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], cwd=cwd, env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _postgres_dump(url: str) -> str:
    engine = make_engine(url)
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
        rows = [str(row) for table in tables for row in conn.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()]
    engine.dispose()
    return "\n".join(rows)


def _dashboard_bodies(config: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    engine = make_engine(settings.resolved_database_url)
    client = TestClient(create_dashboard_app(settings, make_session_factory(engine)), base_url="http://127.0.0.1")
    paths = ["/", "/iterations/1", "/api/status", "/api/lineage", "/api/iterations", "/api/iterations/1", "/api/events", "/metrics", "/healthz"]
    bodies = []
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, path
        bodies.append(response.text)
    engine.dispose()
    return bodies


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_secret_reaches_the_lineage_the_logs_the_files_or_the_pages(
    tmp_path: Path, tiny_model_dir: Path, backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:10]
    secrets = {"api key": f"sk-{tag}", "dashboard token": f"tok-{tag}", "db password": f"dbpw-{tag}", "broker password": f"brpw-{tag}",
               "judge url password": f"jdpw-{tag}"}
    env = {
        "KAIZEN_SERVE__API_KEY": secrets["api key"],
        "KAIZEN_DASHBOARD__TOKEN": secrets["dashboard token"],
        # Eager mode never connects to it: only its place in the configuration matters here.
        "KAIZEN_WORKER__BROKER_URL": f"redis://:{secrets['broker password']}@127.0.0.1:9/0",
        # Recorded only: the cycle judges with the self-judge.
        "KAIZEN_JUDGE__OPENAI__BASE_URL": f"http://judge:{secrets['judge url password']}@127.0.0.1:9/v1",
    }
    if backend == "postgres":  # the local server trusts; the password is carried but not needed
        pg_url = request.getfixturevalue("pg_url")
        env["KAIZEN_DATABASE_URL"] = make_url(pg_url).set(password=secrets["db password"]).render_as_string(hide_password=False)
    data_dir = tmp_path / "data"
    config = tmp_path / "kaizen.yaml"
    config.write_text(yaml.safe_dump(small_cycle_config(data_dir, tiny_model_dir, log_format="json", log_level="debug")))

    outputs = [_kaizen(["cycle", "--config", str(config)], tmp_path, env)]
    outputs += [_kaizen([command, "--config", str(config)], tmp_path, env) for command in ("status", "lineage")]
    outputs.append(_kaizen(["show", "1", "--json", "--config", str(config)], tmp_path, env))
    assert "lineage.ready" in outputs[0]  # the log line that used to carry the database URL

    files = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert any(p.name.startswith("lineage.db") for p in files) == (backend == "sqlite")
    lineage = _postgres_dump(env["KAIZEN_DATABASE_URL"]) if backend == "postgres" else ""
    if backend == "postgres":
        assert "api_key" in lineage and "**********" in lineage  # the snapshot is there, masked
    pages = _dashboard_bodies(config, env, monkeypatch)
    assert any("**********" in body for body in pages)  # the iteration's config is shown, masked

    for what, secret in secrets.items():
        assert not [str(p) for p, content in files.items() if secret.encode() in content], f"{what} in a data-dir file"
        assert secret not in lineage, f"{what} in the lineage DB"
        assert not [o for o in outputs if secret in o], f"{what} in a log or CLI output"
        assert not [b for b in pages if secret in b], f"{what} in a dashboard page"
