"""mask the secrets older versions recorded in clear in iterations' config snapshots

Revision ID: 0008
Revises: 0007

Before secrets were masked, ``Settings.snapshot()`` wrote ``serve.api_key`` and the passwords in
the URL settings (database, broker, artifacts, MLflow, openai judge) into every iteration's
``config_snapshot`` in clear. This masks them in place with the function the snapshot uses
today (``daemon.config.redact_snapshot``), so a stored snapshot reads as a new one would, and
replaces those clear URLs where stage and iteration errors quoted them (the openai judge named
its endpoint in its errors).

The snapshot is part of every stage's input hash, so the stage rows of a rewritten iteration are
hashed again, in stage order, with the function claims use (``digest_stage_inputs``): a running
iteration resumes instead of failing its stored results as "computed from other inputs". The
masked values never reached a computation (they are machine-local keys, taken from the worker's
own config), so the inputs are the same; only their record changed. A stage message queued
before the upgrade carries the old hash and is dropped as stale; the daemon sends it again.

Downgrade does nothing: a masked secret cannot, and must not, come back.
"""
from typing import Any, Sequence, Union
from types import SimpleNamespace

from alembic import op
import sqlalchemy as sa

from daemon.config import URL_KEYS, redact_snapshot
from daemon.stage_runs import StageNotReady, digest_stage_inputs
from daemon.stage_specs import STAGE_ORDER


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The columns this revision reads and writes, as of this revision (not today's models).
iterations = sa.table(
    'iterations', sa.column('id', sa.Integer), sa.column('parent_checkpoint_id', sa.String),
    sa.column('config_snapshot', sa.JSON), sa.column('error', sa.Text),
)
stage_runs = sa.table(
    'stage_runs', sa.column('id', sa.Integer), sa.column('iteration_id', sa.Integer), sa.column('stage', sa.String),
    sa.column('status', sa.String), sa.column('input_hash', sa.String), sa.column('result', sa.JSON), sa.column('error', sa.Text),
)
BATCH = 500  # iterations read at a time: snapshots are a few KB each, a lineage may hold many


def _dotted(snapshot: dict[str, Any], key: str) -> Any:
    for part in key.split('.'):
        snapshot = snapshot.get(part) if isinstance(snapshot, dict) else None
    return snapshot


def _unmasked_urls(clear: dict[str, Any], masked: dict[str, Any]) -> dict[str, str]:
    """clear URL -> its masked form, for each URL setting whose password the masking removed."""
    pairs = ((_dotted(clear, key), _dotted(masked, key)) for key in URL_KEYS)
    return {before: after for before, after in pairs if isinstance(before, str) and before != after}


def _scrubbed(text: str | None, urls: dict[str, str]) -> str | None:
    for clear, masked in urls.items():
        text = text.replace(clear, masked) if text else text
    return text


def _rehash_stages(conn: sa.Connection, iteration: Any, snapshot: dict[str, Any], urls: dict[str, str]) -> None:
    """Hash the iteration's stage rows again over the masked snapshot, upstream first (a stage's
    hash covers its upstream rows' hashes), and mask the clear URLs in their errors."""
    rows = {
        row.stage: SimpleNamespace(**row._mapping)
        for row in conn.execute(sa.select(stage_runs).where(stage_runs.c.iteration_id == iteration.id))
    }
    for stage in (name for name in STAGE_ORDER if name in rows):
        row = rows[stage]
        if row.input_hash is not None:
            try:
                row.input_hash = digest_stage_inputs(iteration.id, stage, iteration.parent_checkpoint_id, snapshot, rows)
            except StageNotReady:
                pass  # claimed while upstream was unfinished: not possible, but never guess a hash
        conn.execute(
            stage_runs.update().where(stage_runs.c.id == row.id).values(input_hash=row.input_hash, error=_scrubbed(row.error, urls))
        )


def _mask_iteration(conn: sa.Connection, iteration: Any) -> None:
    clear = iteration.config_snapshot or {}
    masked = redact_snapshot(clear)
    if masked == clear:
        return  # recorded by a version that masked already, or holding no secret
    urls = _unmasked_urls(clear, masked)
    conn.execute(
        iterations.update().where(iterations.c.id == iteration.id).values(config_snapshot=masked, error=_scrubbed(iteration.error, urls))
    )
    _rehash_stages(conn, iteration, masked, urls)


def upgrade() -> None:
    """Mask the secrets of every recorded config snapshot in place."""
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        # Zero the space the clear rows leave behind: without it the old snapshots stay readable
        # in the file's free pages until a VACUUM.
        conn.exec_driver_sql("PRAGMA secure_delete=ON")
    last_id = 0
    while True:
        batch = conn.execute(
            sa.select(iterations).where(iterations.c.id > last_id).order_by(iterations.c.id).limit(BATCH)
        ).all()
        if not batch:
            return
        for iteration in batch:
            _mask_iteration(conn, iteration)
        last_id = batch[-1].id


def downgrade() -> None:
    """Nothing to undo: masked secrets stay masked."""
