"""lineage identity: a uuid per lineage DB, for lineage-own Celery queues

Revision ID: 0007
Revises: 0006

Every lineage gets its uuid here, existing ones included, so a worker can read which lineage it
serves from any DB at head (workers/celery_app.py names its queues after it).
"""
from datetime import datetime, timezone
from typing import Sequence, Union
import uuid

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    table = op.create_table('lineage_identity',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uuid', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lineage_identity'))
    )
    op.bulk_insert(table, [{'id': 1, 'uuid': uuid.uuid4().hex, 'created_at': datetime.now(timezone.utc)}])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('lineage_identity')
