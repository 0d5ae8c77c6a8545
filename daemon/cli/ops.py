"""`kaizen promote`, `rollback`, `pause` and `resume`: operator actions, each one audited transaction."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.common import ActorOption, ConfigOption, DataDirOption, ReasonOption, app, console, fail, ops_sessions, settings_from
from daemon.config import Settings


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return os.environ.get("USER") or f"uid {os.getuid()}"


def _lineage_change(settings: Settings, change: Any, trusts: Any = None) -> Any:
    """Run ``change(session)`` in one transaction; a refused change exits 1 with its reason.

    ``trusts(session)`` names the checkpoint the change makes champion: it is hashed against its
    manifest first (outside the transaction, which must not wait on gigabytes of hashing).
    """
    from daemon.db.engine import dry_run, transaction
    from daemon.db.lineage import LineageError

    sessions = ops_sessions(settings)
    try:
        if trusts is not None:
            from workers.checkpoints import CheckpointError
            from workers.trust import verify_target

            dry_run(sessions, change)  # the lineage's own refusals first: they are cheap and say more
            try:
                verify_target(settings, sessions, trusts)
            except CheckpointError as exc:
                raise fail(str(exc)) from None
        with transaction(sessions) as session:
            outcome = change(session)
    except LineageError as exc:
        raise fail(str(exc)) from None
    _mirror(settings, sessions)
    return outcome


def _mirror(settings: Settings, sessions: Any) -> None:
    """Move the registry's aliases in the same step; a failure is a warning, never a refusal."""
    if "mlflow" not in settings.tracking.backends:
        return
    from workers.tracking import mirror_registry

    message = mirror_registry(settings, sessions, actor="cli")
    console.print(f"registry mirror: {message}" if message else "registry mirror failed (see the tracking_warning event); `kaizen registry sync` retries")


@app.command()
def promote(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint id, e.g. ckpt-0042 (`kaizen lineage` lists them)")],
    reason: ReasonOption = None,
    actor: ActorOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make CHECKPOINT the champion (one transaction, audited). Rejected checkpoints are refused."""
    from daemon.db import lineage

    settings = settings_from(config, data_dir)
    who = _actor(actor)
    target, previous = _lineage_change(
        settings, lambda s: lineage.manual_promote(s, checkpoint, actor=who, reason=reason), trusts=lambda _s: checkpoint
    )
    console.print(f"promoted {target.id} to champion (previous champion {previous}, now retired); recorded as {who}" + (f": {reason}" if reason else ""))


@app.command()
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="an earlier champion to restore (default: the previous one)")] = None,
    reason: ReasonOption = None,
    actor: ActorOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Restore the previous champion (or --to an earlier one); one transaction, audited."""
    from daemon.db import lineage

    settings = settings_from(config, data_dir)
    who = _actor(actor)
    restored, replaced = _lineage_change(
        settings, lambda s: lineage.rollback(s, actor=who, reason=reason, to=to), trusts=lambda s: to or lineage.rollback_target(s)
    )
    console.print(f"rolled back: champion is {restored.id} again (was {replaced}, now retired); recorded as {who}" + (f": {reason}" if reason else ""))


def _set_paused(paused: bool, reason: str | None, actor: str | None, config: Path | None, data_dir: Path | None) -> None:
    from daemon.db import lineage
    from daemon.views import status_view

    settings = settings_from(config, data_dir)
    who = _actor(actor)
    changed, status = _lineage_change(settings, lambda s: (lineage.set_paused(s, paused, actor=who, reason=reason), status_view(s)))
    if not changed:
        state = f"already paused (by {status['paused_by']} at {status['paused_at']})" if paused else "not paused"
        console.print(f"the daemon is {state}; nothing changed")
        return
    if paused:
        running = status["running_iteration"]
        tail = f"; iteration {running} is in progress and finishes its cycle" if running else ""
        console.print(f"paused by {who}: the daemon starts no new cycle and resumes no interrupted one until `kaizen resume`{tail}")
    else:
        console.print(f"resumed by {who}: the daemon starts cycles again on its schedule")


@app.command()
def pause(reason: ReasonOption = None, actor: ActorOption = None, config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Stop the daemon from starting (or resuming) cycles; audited. Undo with `kaizen resume`."""
    _set_paused(True, reason, actor, config, data_dir)


@app.command()
def resume(reason: ReasonOption = None, actor: ActorOption = None, config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Let a paused daemon start cycles again; audited."""
    _set_paused(False, reason, actor, config, data_dir)


registry_app = typer.Typer(help="The MLflow Model Registry mirror of the lineage (needs mlflow in tracking.backends).", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("sync")
def registry_sync(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Reconcile the registry from the lineage: a version per checkpoint, champion/challenger aliases."""
    from workers.tracking import sync_registry

    settings = settings_from(config, data_dir)
    try:
        result = sync_registry(settings, ops_sessions(settings))
    except Exception as exc:  # the registry is a copy: say why in one line, the lineage is untouched
        raise fail(f"registry sync failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check tracking.mlflow_uri") from None
    console.print(f"registry {result['model']}: {result['versions']} versions, champion alias on {result['champion']}")
