"""ops: the daemon's pause switch, the champion stack for rollbacks, indexes for the dashboard

Revision ID: 0002
Revises: 0001

The champion stack of an existing lineage is rebuilt from its events (init and promotions push,
a rollback returns to the top-most entry of its target), so `kaizen rollback` works on lineages
created before this revision.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Frozen copies of daemon.db.lineage's event kinds: a migration must not change with the code.
_PUSH_EVENTS = ('init', 'promotion', 'manual_promotion')
_ROLLBACK_EVENT = 'rollback'


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('daemon_control',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('changed_by', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_daemon_control'))
    )
    op.create_table('champion_stack',
    sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('checkpoint_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'], name=op.f('fk_champion_stack_checkpoint_id_checkpoints')),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], name=op.f('fk_champion_stack_event_id_events')),
    sa.PrimaryKeyConstraint('position', name=op.f('pk_champion_stack'))
    )
    with op.batch_alter_table('champion_stack', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_champion_stack_checkpoint_id'), ['checkpoint_id'], unique=False)
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.create_index('ix_checkpoints_created_at', ['created_at'], unique=False)
    with op.batch_alter_table('iterations', schema=None) as batch_op:
        batch_op.create_index('ix_iterations_status_decision', ['status', 'decision'], unique=False)
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.create_index('ix_stage_runs_status_stage', ['status', 'stage', 'compute_seconds'], unique=False)
    # Replaces the iteration_id index: same lookups, and the score histograms read only the index.
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.create_index('ix_judgments_iteration_score', ['iteration_id', 'score'], unique=False)
        batch_op.drop_index('ix_judgments_iteration')
    _rebuild_champion_stack()


def _rebuild_champion_stack() -> None:
    conn = op.get_bind()
    events = conn.execute(
        sa.text("SELECT id, kind, checkpoint_id FROM events WHERE checkpoint_id IS NOT NULL AND kind IN "
                "('init', 'promotion', 'manual_promotion', 'rollback') ORDER BY id")
    )
    stack: list[tuple[str, int]] = []
    for event_id, kind, checkpoint_id in events:
        if kind == _ROLLBACK_EVENT and any(c == checkpoint_id for c, _ in stack):
            top = max(i for i, (c, _) in enumerate(stack) if c == checkpoint_id)
            del stack[top + 1:]
        elif kind in _PUSH_EVENTS and (not stack or stack[-1][0] != checkpoint_id):
            stack.append((checkpoint_id, event_id))
    if stack:
        table = sa.table('champion_stack', sa.column('position'), sa.column('checkpoint_id'), sa.column('event_id'))
        op.bulk_insert(table, [{'position': i, 'checkpoint_id': c, 'event_id': e} for i, (c, e) in enumerate(stack)])


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.create_index('ix_judgments_iteration', ['iteration_id'], unique=False)
        batch_op.drop_index('ix_judgments_iteration_score')
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_stage_runs_status_stage')
    with op.batch_alter_table('iterations', schema=None) as batch_op:
        batch_op.drop_index('ix_iterations_status_decision')
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_index('ix_checkpoints_created_at')
    with op.batch_alter_table('champion_stack', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_champion_stack_checkpoint_id'))
    op.drop_table('champion_stack')
    op.drop_table('daemon_control')
