"""Atomic checkpoint store: a checkpoint without a complete, matching manifest does not exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workers.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    is_complete_checkpoint,
    read_manifest,
    verify_checkpoint,
    write_checkpoint,
)
from workers.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _copy_model(src: Path):
    def write_fn(tmp: Path) -> None:
        for p in src.iterdir():
            if p.name == MANIFEST_NAME:  # the tiny model is a checkpoint itself; the copy gets its own
                continue
            shutil.copy2(p, tmp / p.name)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "notes.txt").write_text("nested files are listed too\n")

    return write_fn


def _leftover_temps(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture()
def checkpoint(tmp_path, model_dir) -> Path:
    return write_checkpoint(tmp_path / "ckpt", _copy_model(model_dir), {"parent": "none", "cycle": 1})


def test_write_then_verify_roundtrip(checkpoint, model_dir, tmp_path):
    manifest = verify_checkpoint(checkpoint)
    assert is_complete_checkpoint(checkpoint)
    assert manifest.format_version == 1
    assert manifest.metadata == {"parent": "none", "cycle": 1}
    assert manifest.created_at
    listed = {f.path: f for f in manifest.files}
    assert "model.safetensors" in listed and "sub/notes.txt" in listed
    assert MANIFEST_NAME not in listed
    assert listed["model.safetensors"].size == (model_dir / "model.safetensors").stat().st_size
    assert len(listed["model.safetensors"].sha256) == 64
    assert _leftover_temps(tmp_path) == []
    # the checkpoint is still an ordinary from_pretrained directory
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(checkpoint))


def test_flipped_bytes_fail_with_checksum_message(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch for model\.safetensors"):
        verify_checkpoint(checkpoint)
    assert not is_complete_checkpoint(checkpoint)
    verify_checkpoint(checkpoint, checksums=False)  # the cheap check only looks at sizes


def test_truncated_file_fails_with_size_message(checkpoint):
    path = checkpoint / "sub" / "notes.txt"
    path.write_text("short")
    with pytest.raises(CheckpointError, match=r"size mismatch for sub/notes\.txt"):
        verify_checkpoint(checkpoint)


def test_missing_file_fails(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file config\.json"):
        verify_checkpoint(checkpoint)


def test_missing_manifest_means_no_checkpoint(checkpoint, tmp_path):
    (checkpoint / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing manifest.json"):
        verify_checkpoint(checkpoint)
    assert not is_complete_checkpoint(checkpoint)
    assert not is_complete_checkpoint(tmp_path / "does-not-exist")


def test_corrupt_or_unsafe_manifest_fails(checkpoint):
    mpath = checkpoint / MANIFEST_NAME
    raw = json.loads(mpath.read_text())
    raw["files"].append({"path": "../outside.safetensors", "size": 0, "sha256": "0" * 64})
    mpath.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unsafe path"):
        verify_checkpoint(checkpoint)
    mpath.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest.json"):
        verify_checkpoint(checkpoint)


def test_unlisted_extra_files_are_ignored(checkpoint):
    (checkpoint / "extra.safetensors").write_bytes(b"not listed")
    verify_checkpoint(checkpoint)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "adapter/adapter_model.bin"])
def test_pickle_files_are_refused(checkpoint, name):
    path = checkpoint / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"pickle file .*only safetensors"):
        verify_checkpoint(checkpoint)


def test_write_fn_producing_pickle_is_refused(tmp_path):
    dest = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="pickle"):
        write_checkpoint(dest, lambda tmp: (tmp / "training_args.bin").write_bytes(b"x"), {})
    assert not dest.exists()
    assert _leftover_temps(tmp_path) == []


def test_crash_inside_write_fn_leaves_nothing(tmp_path):
    dest = tmp_path / "ckpt"

    def write_fn(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_checkpoint(dest, write_fn, {"cycle": 3})
    assert not dest.exists()
    assert _leftover_temps(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_second_write_is_idempotent(checkpoint, tmp_path):
    before = (checkpoint / MANIFEST_NAME).read_bytes()
    calls = []
    again = write_checkpoint(checkpoint, lambda tmp: calls.append(tmp), {"parent": "other"})
    assert again == checkpoint
    assert calls == []  # nothing was rewritten
    assert (checkpoint / MANIFEST_NAME).read_bytes() == before
    assert read_manifest(checkpoint).metadata["parent"] == "none"
    assert _leftover_temps(tmp_path) == []


def test_existing_invalid_directory_is_not_overwritten(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"someone else's data")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        write_checkpoint(dest, lambda tmp: (tmp / "a.txt").write_text("a"), {})
    assert (dest / "model.safetensors").read_bytes() == b"someone else's data"
    assert _leftover_temps(tmp_path) == []


def test_empty_existing_directory_is_replaced(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    write_checkpoint(dest, lambda tmp: (tmp / "a.txt").write_text("a"), {})
    assert [f.path for f in verify_checkpoint(dest).files] == ["a.txt"]


def test_unserialisable_metadata_fails_before_writing(tmp_path):
    calls = []
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path / "ckpt", lambda tmp: calls.append(tmp), {"bad": object()})
    assert calls == [] and list(tmp_path.iterdir()) == []
