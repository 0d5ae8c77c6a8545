"""checkpoint model profile: context length, prompt format, special tokens, stop strings

Revision ID: 0006
Revises: 0005

Computed once per checkpoint (workers/model_profile.py) and kept with it, so the lineage says
how every checkpoint was prompted.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('profile', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('profile')
