"""Saved trainer state in a remote artifact store, so another machine's worker can resume it.

Under a local ``artifacts_url`` the trainer saves straight into the artifact store: its state
dir (workers.lora_training.trainer_state_dir) sits beside the checkpoint-to-be under
``<root>/checkpoints``. Under a remote one the checkpoint is trained in a local staging dir, so
each save is also uploaded to ``<root>/checkpoints/.trainer-state-<checkpoint id>/checkpoint-<step>/``
(the same layout), its ``saved.json`` (the file list) last: a save without it is incomplete and
never resumed from. An attempt that finds no local save downloads the newest complete one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from workers import artifacts

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger(__name__)

SAVE_MARKER = "saved.json"
STATE_PREFIX = ".trainer-state-"


@dataclass(frozen=True)
class RemoteTrainerState:
    """The saved trainer states of one checkpoint-to-be in a remote artifact store."""

    uri: str

    def upload(self, save_dir: Path) -> None:
        """Upload one save (``checkpoint-<step>``), marker last, then drop the older ones."""
        fs, root = artifacts.filesystem(self.uri)
        files = sorted(p.relative_to(save_dir).as_posix() for p in save_dir.rglob("*") if p.is_file())
        target = f"{root}/{save_dir.name}"
        for name in files:
            fs.makedirs(f"{target}/{name}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(save_dir / name), f"{target}/{name}")
        fs.pipe_file(f"{target}/{SAVE_MARKER}", json.dumps({"files": files}).encode())
        for older in self._complete_saves()[:-1]:
            fs.rm(f"{root}/{older}", recursive=True)
        log.info("training.state_uploaded", save=save_dir.name, uri=f"{self.uri}/{save_dir.name}", files=len(files))

    def download_newest(self, into: Path) -> Path | None:
        """The newest complete save, downloaded under ``into``; None when there is none."""
        saves = self._complete_saves()
        if not saves:
            return None
        fs, root = artifacts.filesystem(self.uri)
        newest = saves[-1]
        files = json.loads(fs.cat_file(f"{root}/{newest}/{SAVE_MARKER}"))["files"]
        tmp = into / f".download-{newest}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{newest}/{name}", str(tmp / name))
        tmp.rename(into / newest)  # only a whole save gets the name the trainer resumes from
        log.info("training.state_downloaded", save=newest, uri=f"{self.uri}/{newest}")
        return into / newest

    def clear(self) -> None:
        fs, root = artifacts.filesystem(self.uri)
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def _complete_saves(self) -> list[str]:
        """Names of the saves with their marker, oldest step first."""
        fs, root = artifacts.filesystem(self.uri)
        if not fs.exists(root):
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
        complete = [n for n in names if n.startswith("checkpoint-") and fs.exists(f"{root}/{n}/{SAVE_MARKER}")]
        return sorted(complete, key=lambda n: int(n.split("-")[1]))


def remote_trainer_state(settings: Settings, checkpoint_id: str) -> RemoteTrainerState | None:
    """Where a remote artifact store keeps the trainer state of ``checkpoint_id``; None for a local
    store, which holds the trainer's own state dir already."""
    root = artifacts.artifacts_root(settings)
    if artifacts.is_local(root):
        return None
    return RemoteTrainerState(artifacts.join_uri(root, artifacts.CHECKPOINTS, f"{STATE_PREFIX}{checkpoint_id}"))
