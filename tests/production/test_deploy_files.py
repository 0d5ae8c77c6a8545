"""ops/deploy: every kaizen command in the compose file and the systemd units parses, and the
shipped kaizen.yaml is a valid configuration. (No Docker daemon or systemd here to run them.)"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from daemon.cli import app
from daemon.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "ops" / "deploy"


def _parse_kaizen_args(args: list[str]) -> str:
    """Parse ``kaizen ARGS`` exactly as the CLI would, without running it; return the command name."""
    group = typer.main.get_command(app)
    name, *rest = args
    with group.make_context("kaizen", [name, *rest], resilient_parsing=False) as ctx:
        command = group.get_command(ctx, name)
        assert command is not None, f"`kaizen {name}` is not a command"
        command.make_context(name, rest)  # raises a UsageError on an unknown option
    return name


def test_the_compose_file_runs_every_role_with_valid_kaizen_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "daemon", "worker-gpu0", "worker-cpu", "server"} <= set(services)
    commands = {name: _parse_kaizen_args(s["command"]) for name, s in services.items() if s.get("image") == "kaizen:latest"}
    assert commands == {"daemon": "run", "worker-gpu0": "worker", "worker-cpu": "worker", "server": "serve"}
    assert services["daemon"]["deploy"]["replicas"] == 2  # leader + standby
    for name in commands:
        env = services[name]["environment"]
        assert env["KAIZEN_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["KAIZEN_WORKER__BROKER_URL"].startswith("redis://")
    # The published server needs an API key: compose's ${VAR:?message} refuses to start without one.
    server = services["server"]
    assert "0.0.0.0" in server["command"]
    assert server["environment"]["KAIZEN_SERVE__API_KEY"].startswith("${KAIZEN_SERVE__API_KEY:?")
    assert server["environment"]["KAIZEN_DATABASE_URL"] == services["daemon"]["environment"]["KAIZEN_DATABASE_URL"]


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_each_systemd_unit_starts_a_valid_kaizen_command(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0] == "/opt/kaizen/.venv/bin/kaizen"
    assert _parse_kaizen_args(argv[1:]) in {"run", "worker", "serve"}
    assert parser["Service"]["Restart"] == "always"


def test_the_shipped_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_DATABASE_URL", "postgresql+psycopg://kaizen:pw@db/kaizen")
    monkeypatch.setenv("KAIZEN_WORKER__BROKER_URL", "redis://redis:6379/0")
    settings = load_settings(DEPLOY / "kaizen.yaml")
    assert settings.worker.mode == "external"
    assert settings.resolved_broker_url == "redis://redis:6379/0"
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
