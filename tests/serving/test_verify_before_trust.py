"""Verify before trust: one flipped bit in a weight file, size and mtime kept (bit rot, or an
overwrite that preserves timestamps), is refused by `kaizen promote`, `kaizen rollback` and the
server, which had verified that very checkpoint before. A fresh server whose champion is broken
serves the newest earlier champion that verifies and says so on /healthz."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from daemon.bootstrap import initialise
from daemon.cli import app
from daemon.db import lineage
from daemon.db.engine import transaction
from daemon.db.models import Checkpoint, CheckpointStatus
from daemon.logs import configure_logging
from tests.production.harness import assert_lineage_consistent
from tests.serving.harness import Server, serve_settings

pytestmark = pytest.mark.slow


def _flip_a_bit_keeping_mtime(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data, past the safetensors header
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _add_checkpoint(settings, sessions, source: Path, checkpoint_id: str) -> Path:  # type: ignore[no-untyped-def]
    path = settings.artifacts_dir / "checkpoints" / checkpoint_id
    shutil.copytree(source, path)  # manifest included: a complete, verifying checkpoint
    with transaction(sessions) as session:
        session.add(Checkpoint(id=checkpoint_id, parent_id="ckpt-0000", base_model="tiny", path=str(path), status=CheckpointStatus.candidate, metrics={}))
    return path


def _kaizen(settings, *args: str):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(settings.data_dir)])
    configure_logging()  # the CLI bound the logs to the runner's stream, closed now
    return result


def _health(server: Server) -> dict:
    return httpx.get(f"{server.base}/healthz", timeout=10).json()


def _wait(predicate, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_bit_flip_keeping_the_mtime_is_refused_by_promote_rollback_and_the_server(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "initial-model")  # ours to damage
    settings = serve_settings(tmp_path, model)
    sessions = initialise(settings)
    with sessions() as session:
        initial = lineage.current_champion(session)
        assert initial.id == "ckpt-0000" and (Path(initial.path) / "manifest.json").exists()
    first = _add_checkpoint(settings, sessions, model, "ckpt-0001")

    with Server(settings) as server:
        _wait(lambda: _health(server)["checkpoint_id"] == "ckpt-0000", "the server to load ckpt-0000")  # verified once
        with transaction(sessions) as session:
            lineage.promote(session, "ckpt-0001", actor="test", reason="a good candidate")
        _wait(lambda: _health(server)["checkpoint_id"] == "ckpt-0001", "the swap to ckpt-0001")

        _flip_a_bit_keeping_mtime(Path(initial.path))
        refused = _kaizen(settings, "rollback")
        assert refused.exit_code == 1 and "refusing ckpt-0000: it does not verify" in refused.output, refused.output
        with sessions() as session:
            assert lineage.current_champion(session).id == "ckpt-0001"

        # Moved around the CLI (an older kaizen, a hand edit): the server still refuses to swap.
        with transaction(sessions) as session:
            lineage.rollback(session, actor="test", reason="bypassing the check")
        failure = _wait(lambda: _health(server)["last_swap_error"], "the server to refuse ckpt-0000")
        assert failure["checkpoint_id"] == "ckpt-0000" and "sha256" in failure["error"].lower()
        assert _health(server)["checkpoint_id"] == "ckpt-0001"  # still serving the good one

    second = _add_checkpoint(settings, sessions, first, "ckpt-0002")
    _flip_a_bit_keeping_mtime(second)
    refused = _kaizen(settings, "promote", "ckpt-0002")
    assert refused.exit_code == 1 and "refusing ckpt-0002: it does not verify" in refused.output, refused.output
    with sessions() as session:
        assert lineage.current_champion(session).id == "ckpt-0000"

    # A fresh server facing a broken champion serves the newest earlier champion that verifies.
    shutil.copy2(first / "model.safetensors", Path(initial.path) / "model.safetensors")  # ckpt-0000 repaired
    third = _add_checkpoint(settings, sessions, first, "ckpt-0003")
    with transaction(sessions) as session:
        lineage.promote(session, "ckpt-0003", actor="test", reason="then it rots")
    _flip_a_bit_keeping_mtime(third)
    with Server(serve_settings(tmp_path, model)) as fresh:
        health = _wait(lambda: (h := _health(fresh))["checkpoint_id"] and h, "the fresh server to serve something")
        assert health["checkpoint_id"] == "ckpt-0000"
        assert health["fallback"]["serving"] == "ckpt-0000" and health["fallback"]["champion"] == "ckpt-0003"
        assert health["last_swap_error"]["checkpoint_id"] == "ckpt-0003"

    shutil.copy2(first / "model.safetensors", third / "model.safetensors")  # the lineage check wants every checkpoint whole
    shutil.copy2(first / "model.safetensors", second / "model.safetensors")
    assert_lineage_consistent(sessions)


def test_a_plain_model_directory_is_adopted_as_a_checkpoint_with_a_manifest(tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.checkpoints import verify_checkpoint

    plain = shutil.copytree(tiny_model_dir, tmp_path / "hf-model")
    (plain / "manifest.json").unlink()  # as a directory from elsewhere comes
    settings = serve_settings(tmp_path, plain)
    sessions = initialise(settings)
    with sessions() as session:
        champion = lineage.current_champion(session)
    assert Path(champion.path) == settings.artifacts_dir / "checkpoints" / "ckpt-0000"
    manifest = verify_checkpoint(champion.path)
    assert {f.path for f in manifest.files} == {p.name for p in plain.iterdir()}
    assert manifest.metadata["adopted_from"] == str(plain)
    assert not (plain / "manifest.json").exists()  # the operator's directory is left as it was
