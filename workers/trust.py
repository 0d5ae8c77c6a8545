"""Verify before trust: a checkpoint becomes (or is served as) the champion only after every one of
its files has been hashed against its manifest, now, and not from a memo.

The memo of :func:`workers.artifacts.verified_manifest` is keyed by size and mtime, which is right
for stages that load the same checkpoint several times a cycle, and wrong for the moments a
checkpoint is trusted: bit rot and an overwrite that keeps the mtime change neither. So
`kaizen promote`, `kaizen rollback`, the dashboard's buttons and every swap of the server hash
the files in full.

Every checkpoint kaizen registers has a manifest, the initial one included: a local model
directory without one is adopted into the artifact store as ``ckpt-0000`` (files hard-linked
where the filesystem allows, else copied) with a manifest written there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from workers.artifacts import checkpoint_staging_dir, is_local, local_checkpoint, local_path, publish_checkpoint
from workers.checkpoints import MANIFEST_NAME, CheckpointError, verify_checkpoint, write_checkpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session, sessionmaker

    from daemon.config import Settings

log = structlog.get_logger(__name__)

INITIAL_CHECKPOINT_ID = "ckpt-0000"


def is_hub_id(path: str) -> bool:
    """A model named by a Hugging Face hub id (no local directory, no URI): transformers fetches it."""
    return is_local(path) and not local_path(path).exists() and not path.startswith(("/", "."))


def verify_before_trust(settings: Settings, path: str) -> str:
    """Hash every file of the checkpoint at ``path`` against its manifest (CheckpointError if any
    differs) and return the local directory to load it from (a remote one is fetched first).

    A hub id has no manifest kaizen could check: it is returned as it is, with a warning.
    """
    if is_hub_id(path):
        log.warning("checkpoint.unverifiable", path=path, reason="a hub id has no manifest")
        return path
    local = local_checkpoint(settings, path) if not is_local(path) else local_path(path)
    verify_checkpoint(local, checksums=True)
    return str(local)


def verify_target(settings: Settings, sessions: sessionmaker[Session], target_of: Callable[[Session], str | None]) -> None:
    """Verify the checkpoint ``target_of(session)`` names (the one an operator action makes
    champion); CheckpointError saying why it may not be trusted. Outside any transaction: hashing
    gigabytes must not hold the lineage DB."""
    from daemon.db.models import Checkpoint

    with sessions() as session:
        checkpoint_id = target_of(session)
        checkpoint = session.get(Checkpoint, checkpoint_id) if checkpoint_id else None
    if checkpoint is None:
        return  # nothing to restore, or an unknown id: the lineage change itself says so
    try:
        verify_before_trust(settings, checkpoint.path)
    except CheckpointError as exc:
        raise CheckpointError(f"refusing {checkpoint.id}: it does not verify against its manifest ({exc}); nothing was changed") from None


def adopt_initial_model(settings: Settings, path: str) -> str:
    """The path to register as the first champion; a local directory gets a manifest (see module doc)."""
    if is_hub_id(path) or not is_local(path):
        return path
    source = local_path(path).expanduser()
    if not source.is_dir():
        return path  # nothing to adopt; loading it reports what is wrong
    if (source / MANIFEST_NAME).exists():
        verify_checkpoint(source)
        return str(source)

    def link_or_copy(tmp: Path) -> None:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            target = tmp / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, target)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(file, target)

    staging = checkpoint_staging_dir(settings, INITIAL_CHECKPOINT_ID)
    write_checkpoint(staging, link_or_copy, {"adopted_from": str(source)})
    uri = publish_checkpoint(settings, staging, INITIAL_CHECKPOINT_ID)
    log.info("checkpoint.adopted", source=str(source), checkpoint=uri)
    return uri
