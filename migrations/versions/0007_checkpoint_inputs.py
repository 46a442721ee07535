"""checkpoints.inputs: a digest of what a finished upstream method computed from, so later jobs
can reuse its start

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inputs', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_checkpoints_inputs'), ['inputs'], unique=False)


def downgrade() -> None:
    # The digests are only for reuse; a reused start's checkpoint names its origin in its own state.
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_checkpoints_inputs'))
        batch_op.drop_column('inputs')
