"""Artifacts (checkpoints, datasets) addressed by URI through fsspec.

``artifacts_url`` in the config names where they live: a local directory by default
(``<data_dir>/artifacts``), or any fsspec URL that workers on other machines can reach —
``s3://bucket/kaizen`` once the ``s3`` extra (s3fs) is installed, ``gcs://``, ``memory://`` in
tests. A URI is what the lineage DB records as ``checkpoints.path``.

Local roots keep the atomic local layout of :mod:`workers.checkpoints` (temp dir, manifest last,
one rename). On an object store there is no rename, so a checkpoint is published under a
content-addressed name (``<id>-<manifest sha>``) with its manifest uploaded last: a reader
either finds the manifest (and every file it lists) or no checkpoint at all, and two attempts
of the same training stage (a redelivered task) never write into each other's files. The lineage
DB records the URI only after the upload is complete.

Models are loaded from local directories; a remote checkpoint is downloaded once into
``<data_dir>/cache/checkpoints`` and verified against its manifest there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import structlog
from fsspec.core import split_protocol, url_to_fs

from workers.checkpoints import MANIFEST_NAME, CheckpointError, Manifest, parse_manifest, read_manifest, verify_checkpoint

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger(__name__)

LOCAL_PROTOCOLS = frozenset({None, "file", "local"})
CHECKPOINTS = "checkpoints"
DATASETS = "datasets"

__all__ = [
    "ArtifactError",
    "artifacts_root",
    "checkpoint_staging_dir",
    "is_local",
    "join_uri",
    "local_checkpoint",
    "model_path_for_loading",
    "filesystem",
    "publish_checkpoint",
    "read_jsonl",
    "verified_manifest",
    "write_dataset",
    "write_jsonl",
]


class ArtifactError(RuntimeError):
    """An artifact URI that cannot be used (unknown protocol, missing fsspec backend...)."""


# --------------------------------------------------------------------------- URIs


def artifacts_root(settings: Settings) -> str:
    return settings.artifacts_url or str(settings.artifacts_dir)


def is_local(uri: str | Path) -> bool:
    protocol, _ = split_protocol(str(uri))
    return protocol in LOCAL_PROTOCOLS


def local_path(uri: str | Path) -> Path:
    """The filesystem path of a local URI (a plain path or ``file://...``)."""
    protocol, path = split_protocol(str(uri))
    if protocol not in LOCAL_PROTOCOLS:
        raise ArtifactError(f"{uri} is not a local path")
    return Path(path).expanduser()


def join_uri(base: str | Path, *parts: str) -> str:
    if is_local(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(uri)
    except ImportError as exc:
        raise ArtifactError(
            f"no fsspec backend for {uri}: {exc}. For s3:// install the extra: pip install 'kaizen[s3]'"
        ) from exc
    except ValueError as exc:
        raise ArtifactError(f"unusable artifact URI {uri!r}: {exc}") from exc


# --------------------------------------------------------------------------- checkpoints


def checkpoint_staging_dir(settings: Settings, checkpoint_id: str) -> Path:
    """Where training writes a checkpoint: its final place under a local root, a local staging
    directory under a remote one (then :func:`publish_checkpoint` uploads it)."""
    root = artifacts_root(settings)
    if is_local(root):
        return local_path(root) / CHECKPOINTS / checkpoint_id
    return settings.resolved_data_dir / "staging" / CHECKPOINTS / checkpoint_id


def publish_checkpoint(settings: Settings, local_dir: str | Path, checkpoint_id: str) -> str:
    """Make the complete checkpoint in ``local_dir`` reachable at the URI returned.

    Under a local root the staging directory is the final place: its path is returned. Under a
    remote root the files are uploaded to ``checkpoints/<id>-<manifest sha>/``, manifest last,
    and the local staging copy is removed (workers would otherwise keep every model they trained).
    """
    source = Path(local_dir)
    manifest = verify_checkpoint(source)  # never publish a checkpoint that does not verify
    root = artifacts_root(settings)
    if is_local(root):
        return str(source)
    digest = hashlib.sha256((source / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
    uri = join_uri(root, CHECKPOINTS, f"{checkpoint_id}-{digest}")
    fs, path = filesystem(uri)
    if not fs.exists(f"{path}/{MANIFEST_NAME}"):  # content-addressed: else this exact one is there already
        for entry in manifest.files:
            target = f"{path}/{entry.path}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(source / entry.path), target)
        fs.put_file(str(source / MANIFEST_NAME), f"{path}/{MANIFEST_NAME}")  # last: from here on it exists
        log.info("checkpoint.published", checkpoint_id=checkpoint_id, uri=uri, files=len(manifest.files))
    shutil.rmtree(source, ignore_errors=True)
    return uri


def local_checkpoint(settings: Settings, uri: str) -> Path:
    """A local, verified directory holding the checkpoint at ``uri`` (downloaded once if remote)."""
    if is_local(uri):
        path = local_path(uri)
        verified_manifest(path)
        return path
    fs, path = filesystem(uri)
    manifest_path = f"{path}/{MANIFEST_NAME}"
    if not fs.exists(manifest_path):
        raise CheckpointError(f"checkpoint {uri}: missing {MANIFEST_NAME} (incomplete or not a checkpoint)")
    manifest_bytes = fs.cat_file(manifest_path)
    manifest = parse_manifest(manifest_bytes, uri)
    cache = _cache_dir(settings, uri)
    if (cache / MANIFEST_NAME).is_file() and (cache / MANIFEST_NAME).read_bytes() == manifest_bytes:
        verified_manifest(cache)
        return cache
    _download(fs, path, manifest, manifest_bytes, cache)
    verified_manifest(cache)
    log.info("checkpoint.fetched", uri=uri, cache=str(cache))
    return cache


def _cache_dir(settings: Settings, uri: str) -> Path:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return settings.resolved_data_dir / "cache" / CHECKPOINTS / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def _download(fs: fsspec.AbstractFileSystem, path: str, manifest: Manifest, manifest_bytes: bytes, cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{cache.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for entry in manifest.files:
            target = tmp.joinpath(*entry.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path}/{entry.path}", str(target))
        (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)
        verify_checkpoint(tmp)  # a truncated download never reaches the cache
        if cache.exists():
            shutil.rmtree(cache)  # a stale or partial copy of an older publication
        os.replace(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_path_for_loading(settings: Settings, path: str) -> str:
    """The local directory (or hub id) to load a model from, refusing broken kaizen checkpoints.

    A checkpoint kaizen wrote (anything remote, anything under the local artifacts root, any
    directory with a manifest) must verify against its manifest: a truncated or corrupted one
    raises :class:`CheckpointError` saying which file is wrong. A model the operator configured
    (``model.path``: a plain Hugging Face directory or hub id) is loaded as given.
    """
    if not is_local(path):
        return str(local_checkpoint(settings, path))
    local = local_path(path)
    root = artifacts_root(settings)
    if (local / MANIFEST_NAME).exists() or (is_local(root) and _is_within(local, local_path(root))):
        verified_manifest(local)
    return str(local)


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


_verified: dict[str, tuple[tuple[Any, ...], Manifest]] = {}
_verified_lock = threading.Lock()


def verified_manifest(path: str | Path) -> Manifest:
    """:func:`verify_checkpoint` with checksums, remembered per process while no file changes.

    Stages load the same checkpoint several times per cycle; hashing gigabytes each time would
    cost more than the stage. The memo is keyed by every listed file's size and mtime, so a file
    truncated or rewritten after the first check is checked again.
    """
    root = Path(path).resolve()
    manifest = read_manifest(root)
    stamp = _stat_stamp(root, manifest)
    with _verified_lock:
        known = _verified.get(str(root))
    if known is not None and known[0] == stamp:
        return known[1]
    manifest = verify_checkpoint(root)
    with _verified_lock:
        _verified[str(root)] = (_stat_stamp(root, manifest), manifest)
    return manifest


def _stat_stamp(root: Path, manifest: Manifest) -> tuple[Any, ...]:
    stamps: list[Any] = [(root / MANIFEST_NAME).stat().st_mtime_ns]
    for entry in manifest.files:
        try:
            st = (root / entry.path).stat()
            stamps.append((entry.path, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((entry.path, None, None))
    return tuple(stamps)


# --------------------------------------------------------------------------- datasets


def write_dataset(settings: Settings, iteration_id: int, name: str, records: Iterable[dict[str, Any]]) -> str:
    """Store a dataset of one iteration (JSON lines) and return its URI."""
    uri = join_uri(artifacts_root(settings), DATASETS, f"iteration-{iteration_id:04d}", name)
    write_jsonl(uri, records)
    return uri


def write_jsonl(uri: str, records: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines so that a reader sees the whole file or none of it."""
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return
    fs, path = filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)  # one object PUT: atomic on object stores


def read_jsonl(uri: str) -> Iterator[dict[str, Any]]:
    if is_local(uri):
        data = local_path(uri).read_bytes()
    else:
        fs, path = filesystem(uri)
        data = fs.cat_file(path)
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)
