"""judges: which judge made each judgment; the verifiable constraints a prompt carries

Revision ID: 0004
Revises: 0003

Judgments recorded before this revision keep a null judge (they were all made by the self-judge
in the configured mode, which their iteration's config snapshot records). Prompts without
constraints keep null.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('judge', sa.String(length=128), nullable=True))
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('constraints', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_column('constraints')
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.drop_column('judge')
