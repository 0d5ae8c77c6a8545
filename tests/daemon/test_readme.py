"""The README stays true: its commands table lists every command, and its serving example runs
as written after the quickstart's install steps alone."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from daemon.cli import app
from tests.factories import small_cycle_config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
QUICKSTART = REPO / "ops" / "quickstart.sh"
EXAMPLE_ADDRESS = "127.0.0.1:8000"
# Run after the README's blocks, in the same interpreter: each method answered, and says so.
CHECKS = """
import json
for steering in ({"method": "urial"}, {"method": "steerlm", "attributes": {"verbosity": 1}}, {"method": "genarm", "reward_models": {"loop": 1.0}}):
    reply = ask(steering)
    print("CHECK", json.dumps({"fingerprint": reply.system_fingerprint, "kaizen": reply.model_extra["kaizen"]}))
"""


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)


# --------------------------------------------------------------------------- the commands table


def _commands_in_help() -> set[str]:
    out = CliRunner().invoke(app, ["--help"]).stdout
    panel = out.split("Commands", 1)[1]
    # Rich draws "│ name   description"; plain click "  name  description"; wrapped descriptions are indented further.
    return set(re.findall(r"^[│|]?\s{1,2}([a-z][a-z0-9_-]*)\s{2,}\S", panel, flags=re.M))


def test_the_commands_table_lists_every_kaizen_command():
    rows = [line for line in _section("Commands").splitlines() if line.startswith("| `kaizen ")]
    documented = {name for row in rows for name in re.findall(r"`kaizen ([a-z][a-z0-9_-]*)", row.split("|")[1])}
    # Derived from the app itself, so a new command without a README row fails here.
    commands = {name for name, command in typer.main.get_command(app).commands.items() if not command.hidden}

    assert _commands_in_help() == commands
    assert documented == commands, f"missing rows: {sorted(commands - documented)}, stale rows: {sorted(documented - commands)}"


# --------------------------------------------------------------------------- the serving example


def _install_steps() -> list[str]:
    """The quickstart's own venv and pip lines, in order (everything before it runs the daemon)."""
    lines = [line.strip() for line in QUICKSTART.read_text().splitlines()]
    steps = [line for line in lines if line.startswith(("python3 -m venv", ".venv/bin/pip install"))]
    assert steps[0] == "python3 -m venv .venv" and len(steps) >= 3, steps
    return steps


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"kaizen serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"kaizen serve was not ready within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def quickstart_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv made by exactly the quickstart's install commands (pip's cache may serve the wheels)."""
    root = tmp_path_factory.mktemp("quickstart")
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO / ".venv")))
    for step in _install_steps():
        command = step.replace(".venv", str(venv))
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return venv


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_serving_example_runs_as_written_after_the_quickstart_install(quickstart_venv: Path, tmp_path: Path):
    blocks = _code_blocks(_section("Serving the champion"), "python")
    assert len(blocks) == 2 and blocks[0].count(EXAMPLE_ADDRESS) == 1, blocks
    kaizen = str(quickstart_venv / "bin" / "kaizen")
    port = _free_port()
    # The cheapest lineage that serves all three steering methods: the tiny model, one small cycle
    # that also trains the GenARM reward model ("loop").
    config = small_cycle_config(
        tmp_path / "data", "tiny", genarm={"enabled": True, "max_steps": 2, "batch_size": 2, "max_length": 128},
        serve={"port": port, "max_new_tokens": 8},
    )
    config_path = tmp_path / "kaizen.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_") and k != "VIRTUAL_ENV"}
    cycle = subprocess.run([kaizen, "cycle", "-c", str(config_path)], env=env, capture_output=True, text=True, timeout=600)
    assert cycle.returncode == 0, cycle.stderr[-3000:]

    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([kaizen, "serve", "-c", str(config_path)], env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", server, log)
        # Verbatim, except the port: a shared machine may already have something on 8000.
        script = "\n".join([*blocks, CHECKS]).replace(EXAMPLE_ADDRESS, f"127.0.0.1:{port}")
        client = subprocess.run(
            [str(quickstart_venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    assert client.returncode == 0, f"{client.stderr[-3000:]}\nserver log:\n{log.read_text()[-2000:]}"
    checked = [json.loads(line[len("CHECK ") :]) for line in client.stdout.splitlines() if line.startswith("CHECK ")]
    assert [c["kaizen"]["steering"]["method"] for c in checked] == ["urial", "steerlm", "genarm"], checked
    assert {c["fingerprint"] for c in checked} == {c["kaizen"]["checkpoint_id"] for c in checked} and len(checked) == 3
