"""Artifacts by URI (workers/artifacts.py): local paths, fsspec's in-memory store as a remote one."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

import fsspec
import pytest

from daemon.config import load_settings
from workers import artifacts
from workers.checkpoints import CheckpointError, verify_checkpoint, write_checkpoint


def _settings(tmp_path: Path, artifacts_url: str | None = None):  # type: ignore[no-untyped-def]
    return load_settings(None, data_dir=tmp_path / "data", artifacts_url=artifacts_url)


def _fake_checkpoint(dest: Path) -> Path:
    def fill(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(os.urandom(4096))
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text('{"r": 8}')

    return write_checkpoint(dest, fill, {"kind": "test"})


@pytest.fixture()
def memory_root():  # type: ignore[no-untyped-def]
    root = f"memory://kaizen-test-{uuid.uuid4().hex[:8]}/artifacts"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_local_checkpoints_stay_in_place_and_are_verified_before_loading(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    staging = artifacts.checkpoint_staging_dir(settings, "ckpt-0001")
    assert staging == settings.artifacts_dir / "checkpoints" / "ckpt-0001"
    _fake_checkpoint(staging)

    uri = artifacts.publish_checkpoint(settings, staging, "ckpt-0001")
    assert uri == str(staging)
    assert artifacts.model_path_for_loading(settings, uri) == str(staging)

    weights = staging / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="size mismatch for model.safetensors"):
        artifacts.model_path_for_loading(settings, uri)


def test_a_directory_under_the_artifacts_root_without_a_manifest_is_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    half_written = settings.artifacts_dir / "checkpoints" / "ckpt-0002"
    half_written.mkdir(parents=True)
    (half_written / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing manifest.json"):
        artifacts.model_path_for_loading(settings, str(half_written))


def test_a_model_the_operator_configured_loads_as_given(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    external = tmp_path / "hf-model"
    external.mkdir()
    (external / "config.json").write_text("{}")
    assert artifacts.model_path_for_loading(settings, str(external)) == str(external)
    assert artifacts.model_path_for_loading(settings, "org/some-hub-id") == "org/some-hub-id"


def test_remote_checkpoints_are_published_manifest_last_and_fetched_verified(tmp_path: Path, memory_root: str) -> None:
    settings = _settings(tmp_path, memory_root)
    staging = artifacts.checkpoint_staging_dir(settings, "ckpt-0001")
    assert str(staging).startswith(str(settings.resolved_data_dir / "staging"))
    _fake_checkpoint(staging)

    staged_files = verify_checkpoint(staging).files
    backup = shutil.copytree(staging, tmp_path / "backup")

    uri = artifacts.publish_checkpoint(settings, staging, "ckpt-0001")

    assert uri.startswith(f"{memory_root}/checkpoints/ckpt-0001-")
    assert not staging.exists(), "the worker's staging copy is removed once uploaded"
    shutil.copytree(backup, staging)
    assert artifacts.publish_checkpoint(settings, staging, "ckpt-0001") == uri  # content-addressed: idempotent
    local = Path(artifacts.model_path_for_loading(settings, uri))
    assert local.is_relative_to(settings.resolved_data_dir / "cache")
    assert verify_checkpoint(local).files == staged_files
    assert (local / "adapter" / "adapter_config.json").read_text() == '{"r": 8}'


def test_a_remote_checkpoint_with_a_corrupted_file_never_reaches_the_cache(tmp_path: Path, memory_root: str) -> None:
    settings = _settings(tmp_path, memory_root)
    staging = _fake_checkpoint(artifacts.checkpoint_staging_dir(settings, "ckpt-0001"))
    uri = artifacts.publish_checkpoint(settings, staging, "ckpt-0001")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe_file(f"{path}/model.safetensors", os.urandom(4096))  # same size, other bytes

    with pytest.raises(CheckpointError, match="checksum mismatch for model.safetensors"):
        artifacts.model_path_for_loading(settings, uri)
    cache = settings.resolved_data_dir / "cache" / "checkpoints"
    assert list(cache.iterdir()) == []  # neither a cached copy nor a leftover temp dir


def test_a_remote_upload_interrupted_before_its_manifest_is_no_checkpoint(tmp_path: Path, memory_root: str) -> None:
    settings = _settings(tmp_path, memory_root)
    staging = _fake_checkpoint(artifacts.checkpoint_staging_dir(settings, "ckpt-0001"))
    uri = artifacts.publish_checkpoint(settings, staging, "ckpt-0001")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.rm(f"{path}/manifest.json")  # what a publisher killed before its last upload leaves behind

    with pytest.raises(CheckpointError, match="missing manifest.json"):
        artifacts.model_path_for_loading(settings, uri)


@pytest.mark.parametrize("remote", [False, True])
def test_datasets_round_trip_as_json_lines(tmp_path: Path, memory_root: str, remote: bool) -> None:
    settings = _settings(tmp_path, memory_root if remote else None)
    records = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}, {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]

    uri = artifacts.write_dataset(settings, 7, "preference_pairs.jsonl", records)

    assert uri.endswith("datasets/iteration-0007/preference_pairs.jsonl")
    assert artifacts.is_local(uri) is not remote
    assert list(artifacts.read_jsonl(uri)) == records


def test_an_s3_uri_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here; the message is for machines without the extra")
    settings = _settings(tmp_path, "s3://kaizen-bucket/artifacts")
    staging = _fake_checkpoint(artifacts.checkpoint_staging_dir(settings, "ckpt-0001"))
    with pytest.raises(artifacts.ArtifactError, match=r"kaizen\[s3\]"):
        artifacts.publish_checkpoint(settings, staging, "ckpt-0001")


def test_a_writer_killed_mid_checkpoint_leaves_a_temp_dir_the_next_writer_removes(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoints" / "ckpt-0001"
    dest.parent.mkdir(parents=True)
    host = socket.gethostname()
    dead_pid = _a_pid_that_is_not_running()
    orphan = dest.parent / f".tmp-ckpt-0001-{host}-{dead_pid}-0123456789ab"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    live = dest.parent / f".tmp-ckpt-0001-{host}-{os.getppid()}-ba9876543210"  # a concurrent writer, alive
    live.mkdir()

    _fake_checkpoint(dest)

    assert not orphan.exists()
    assert live.exists()
    shutil.rmtree(live)


def _a_pid_that_is_not_running() -> int:
    for pid in range(4_000_000, 4_100_000, 997):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("every probed pid is alive")


@pytest.mark.slow
def test_a_cycle_with_a_remote_artifact_store_trains_publishes_and_gates_from_uris(
    tmp_path: Path, tiny_model_dir: Path, memory_root: str
) -> None:
    from sqlalchemy import select

    from daemon.bootstrap import initialise
    from daemon.cycle import run_cycle
    from daemon.db.models import Checkpoint, Evaluation, StageRun
    from daemon.dispatch import EagerDispatcher
    from tests.factories import small_cycle_settings

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, artifacts_url=memory_root)
    sessions = initialise(settings)

    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))

    with sessions() as session:
        candidate = session.scalars(select(Checkpoint).where(Checkpoint.created_iteration_id == report.iteration_id)).one()
        dpo = session.scalars(select(StageRun).where(StageRun.stage == "dpo_update")).one().result
        evaluation = session.scalars(select(Evaluation)).one()
    assert candidate.path.startswith(f"{memory_root}/checkpoints/ckpt-0001-")
    assert candidate.adapter_path == f"{candidate.path}/adapter"
    assert dpo["dataset"] == f"{memory_root}/datasets/iteration-0001/preference_pairs.jsonl"
    assert len(list(artifacts.read_jsonl(dpo["dataset"]))) == dpo["pairs"]
    # The gate loaded the candidate from its URI (via the verified local cache) and compared it.
    assert report.decision in {"promoted", "rejected"}
    assert not any("refused at load" in r for r in evaluation.reasons["reasons"])
    assert len(evaluation.comparisons["items"]) == settings.gate.heldout_prompts
    assert not (settings.resolved_data_dir / "staging" / "checkpoints" / "ckpt-0001").exists()
    assert list((settings.resolved_data_dir / "cache" / "checkpoints").iterdir())
