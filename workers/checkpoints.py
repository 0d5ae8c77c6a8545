"""Atomic, self-verifying checkpoint directories.

A checkpoint is a directory whose ``manifest.json`` lists every file in it with its size and
SHA-256. The manifest is written last, after every other file is flushed to disk, and the
whole directory appears at its final path through a single ``os.replace`` of a temporary
sibling directory. So a reader either sees no checkpoint at all or a complete one, and a
checkpoint without a complete, matching manifest does not exist.

Only safetensors weights are accepted: a checkpoint holding pickle files (``*.bin``, ``*.pt``
...) is refused by :func:`verify_checkpoint`, since loading those runs arbitrary code.

Paths here are local directories. Checkpoints addressed by URI (``s3://...``) are published
and fetched by :mod:`workers.artifacts`, which keeps the same rule on object stores: the
manifest is uploaded last, so a checkpoint without it does not exist.

A writer killed mid-write (``kill -9``, OOM) leaves its temporary directory behind; its name
carries the writer's host and pid, so the next writer of the same checkpoint on that host
removes it once that pid is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "CheckpointError",
    "FileEntry",
    "Manifest",
    "is_complete_checkpoint",
    "parse_manifest",
    "read_manifest",
    "verify_checkpoint",
    "write_checkpoint",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Weight/state formats that are Python pickles: loading them can execute code.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or in a refused format."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format_version: int
    files: tuple[FileEntry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    path: str = ""  # the checkpoint directory this manifest was read from

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "metadata": self.metadata,
            "created_at": self.created_at,
        }


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the entries (new names) durable; not possible on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _walk_files(root: Path) -> list[Path]:
    """All regular files below ``root`` (sorted), refusing symlinks and special files."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():
                raise CheckpointError(f"checkpoint {root}: symlinked directory {base / name} is not allowed")
        for name in filenames:
            p = base / name
            if p.is_symlink() or not p.is_file():
                raise CheckpointError(f"checkpoint {root}: {p} is not a regular file (symlinks are not allowed)")
            out.append(p)
    return sorted(out)


def _rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _refuse_pickles(root: Path) -> None:
    for p in _walk_files(root):
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"checkpoint {root}: {p.relative_to(root).as_posix()} is a pickle file ({p.suffix}); "
                "only safetensors weights are accepted"
            )


# --------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> Manifest:
    """Parse ``manifest.json`` of a checkpoint without checking the files (see verify_checkpoint)."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root}: directory does not exist")
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {root}: missing {MANIFEST_NAME} (incomplete or not a checkpoint)")
    return parse_manifest(mpath.read_bytes(), str(root))


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse the bytes of a ``manifest.json`` read from ``where`` (a directory path or URI)."""
    try:
        raw = json.loads(data.decode("utf-8"))
        version = raw["format_version"]
        files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"])
        metadata = dict(raw.get("metadata") or {})
        created_at = str(raw.get("created_at", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {where}: unreadable {MANIFEST_NAME}: {exc!r}") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where}: unsupported manifest format_version {version!r}")
    return Manifest(version, files, metadata, created_at, where)


def verify_checkpoint(path: str | Path, *, checksums: bool = True) -> Manifest:
    """Check that ``path`` is a complete checkpoint; return its manifest or raise CheckpointError.

    Every file listed must exist with the recorded size and (if ``checksums``) SHA-256. Files
    present but not listed are ignored, except pickles, which are refused anywhere in the tree.
    """
    root = Path(path)
    manifest = read_manifest(root)
    _refuse_pickles(root)
    for entry in manifest.files:
        rel = PurePosixPath(entry.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise CheckpointError(f"checkpoint {root}: manifest lists an unsafe path {entry.path!r}")
        fpath = root.joinpath(*rel.parts)
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {root}: missing file {entry.path}")
        size = fpath.stat().st_size
        if size != entry.size:
            raise CheckpointError(
                f"checkpoint {root}: size mismatch for {entry.path}: expected {entry.size} bytes, found {size}"
            )
        if checksums:
            actual = _sha256(fpath)
            if actual != entry.sha256:
                raise CheckpointError(
                    f"checkpoint {root}: checksum mismatch for {entry.path}: "
                    f"expected sha256 {entry.sha256}, found {actual}"
                )
    return manifest


def is_complete_checkpoint(path: str | Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


# --------------------------------------------------------------------------- writing


def write_checkpoint(
    dest_dir: str | Path,
    write_fn: Callable[[Path], None],
    metadata: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically to ``dest_dir`` and return its path.

    ``write_fn(tmp)`` fills a temporary sibling directory (same filesystem); then the manifest
    is written last, everything is fsynced and the directory is renamed into place. If
    ``dest_dir`` already holds a valid checkpoint it is returned untouched (idempotent re-run;
    ``write_fn`` is not called). On any error the temporary directory is removed and the
    exception re-raised; ``dest_dir`` is never left half-written.
    """
    dest = Path(dest_dir)
    json.dumps(metadata)  # fail early (before any work) on metadata that cannot be stored

    if _existing_valid(dest):
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temp_dirs(dest)
    tmp = dest.parent / f"{_temp_prefix(dest)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write_fn(tmp)
        if (tmp / MANIFEST_NAME).exists():
            raise CheckpointError(f"write_fn must not create {MANIFEST_NAME} itself")
        _refuse_pickles(tmp)

        entries = []
        for p in _walk_files(tmp):
            _fsync_file(p)
            entries.append(FileEntry(p.relative_to(tmp).as_posix(), p.stat().st_size, _sha256(p)))
        manifest = Manifest(
            FORMAT_VERSION, tuple(entries), dict(metadata), datetime.now(UTC).isoformat(timespec="seconds")
        )
        mpath = tmp / MANIFEST_NAME
        with open(mpath, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_json(), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        for dirpath, _dirnames, _filenames in os.walk(tmp):
            _fsync_dir(Path(dirpath))

        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty leftover directory is not a checkpoint; rename needs the name free
        try:
            os.replace(tmp, dest)
        except OSError:
            # Lost a race with a concurrent writer of the same checkpoint: theirs is as good as ours.
            if _existing_valid(dest):
                _rmtree_quiet(tmp)
                return dest
            raise
        _fsync_dir(dest.parent)
    except BaseException:
        _rmtree_quiet(tmp)
        raise
    return dest


def _temp_prefix(dest: Path) -> str:
    return f".tmp-{dest.name}-{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_orphaned_temp_dirs(dest: Path) -> None:
    """Remove temp dirs of ``dest`` left by writers on this host that no longer run (kill -9, OOM).

    Only this host's writers are judged: a pid means nothing on another machine sharing the
    directory. A live pid's temp dir is left alone: it may be a concurrent writer.
    """
    prefix = _temp_prefix(dest)
    for sibling in dest.parent.glob(f"{glob_escape(prefix)}*"):
        pid_text = sibling.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            _rmtree_quiet(sibling)


def _existing_valid(dest: Path) -> bool:
    """True if ``dest`` is already a valid checkpoint; raise if it is something else non-empty."""
    if not dest.exists():
        return False
    if dest.is_dir() and not any(dest.iterdir()):
        return False
    try:
        verify_checkpoint(dest)
    except CheckpointError as exc:
        raise CheckpointError(
            f"refusing to overwrite {dest}: it exists but is not a valid checkpoint ({exc})"
        ) from exc
    return True
