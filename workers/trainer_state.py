"""Saved trainer state: where a training stage saves it, resumes from it, and hands over at a shutdown.

Every resumable trainer (the TRL LoRA trainers of workers.lora_training: DPO, SteerLM SFT; the
GenARM reward-model loop of workers.genarm.training) saves ``checkpoint-<step>/`` directories
(with a ``trainer_state.json`` holding ``global_step``) every ``save_steps`` into
:func:`trainer_state_dir`, resumes from the newest one (:func:`resumable_output_dir`), and, asked
to stop by a worker shutdown (workers/graceful_stop.py), saves at the end of the step and ends
the stage unfinished (:func:`hand_over_if_stopped`).

Under a local ``artifacts_url`` the trainer saves straight into the artifact store: its state
dir (:func:`trainer_state_dir`) sits beside the checkpoint-to-be under
``<root>/checkpoints``. Under a remote one the checkpoint is trained in a local staging dir, so
each save is also uploaded to ``<root>/checkpoints/.trainer-state-<checkpoint id>/checkpoint-<step>/``
(the same layout), its ``saved.json`` (the file list) last: a save without it is incomplete and
never resumed from. An attempt that finds no local save downloads the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.stage_runs import StageInterrupted
from workers import artifacts
from workers.graceful_stop import stop_requested

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger(__name__)

SAVE_MARKER = "saved.json"
STATE_PREFIX = ".trainer-state-"
STEP_FILE = "trainer_state.json"  # in each save: {"global_step": N, ...} (the HF Trainer's own file)
_SAVE_NAME = re.compile(r"^checkpoint-(\d+)$")


def trainer_state_dir(out: Path) -> Path:
    """Where the trainer state of the checkpoint-to-be ``out`` is saved: beside it, the same for
    every attempt of the stage, so an attempt taken over after its worker died finds it."""
    return out.parent / f"{STATE_PREFIX}{out.name}"


def newest_save(state_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` save with the highest step in ``state_dir``; None when there is none."""
    if not state_dir.is_dir():
        return None
    saves = [p for p in state_dir.iterdir() if p.is_dir() and _SAVE_NAME.match(p.name)]
    return max(saves, key=lambda p: int(p.name.split("-")[1])) if saves else None


def saved_step(save: str | Path | None) -> int:
    """The trainer's ``global_step`` recorded in a save (0 for none: training starts at step 0)."""
    if save is None:
        return 0
    return int(json.loads((Path(save) / STEP_FILE).read_text())["global_step"])


@contextlib.contextmanager
def resumable_output_dir(
    out: Path, save_steps: int, scratch_prefix: str, state_store: RemoteTrainerState | None
) -> Iterator[tuple[str, str | None]]:
    """(output dir, newest saved state to resume from or None) for training the checkpoint-to-be ``out``.

    With ``save_steps > 0``: the state dir (:func:`trainer_state_dir`); with no save on this
    machine, the newest one in the remote artifact store is fetched. Else a scratch dir, no resume.
    """
    if save_steps <= 0:
        with tempfile.TemporaryDirectory(prefix=scratch_prefix) as scratch:
            yield scratch, None
        return
    state = trainer_state_dir(out)
    state.mkdir(parents=True, exist_ok=True)
    newest = newest_save(state)
    if newest is None and state_store is not None:
        newest = state_store.download_newest(state)
    yield str(state), str(newest) if newest else None


def hand_over_if_stopped(kind: str, step: int, max_steps: int, state_dir: str | Path) -> None:
    """A run stopped by a shutdown request before its last step is not a model: it ends the stage
    unfinished (StageInterrupted), its state saved at ``step`` for the next worker to resume."""
    if not stop_requested() or step >= max_steps:
        return
    log.warning("training.stopped_for_shutdown", kind=kind, saved_step=step, state=str(state_dir))
    raise StageInterrupted(f"{kind} stopped at step {step} of {max_steps} for a worker shutdown; its state is saved in {state_dir}")


def forget_saved_state(out: Path, state_store: RemoteTrainerState | None) -> None:
    """The checkpoint ``out`` is committed: its saved trainer state (here and remote) is not needed."""
    shutil.rmtree(trainer_state_dir(out), ignore_errors=True)
    if state_store is not None:
        state_store.clear()


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
