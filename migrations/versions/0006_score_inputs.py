"""scores.inputs: a digest of what a PT or FT run computed from, so later jobs can reuse it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inputs', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_scores_inputs'), ['inputs'], unique=False)


def downgrade() -> None:  # the digests only let later jobs reuse runs: nothing stored is lost without them
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scores_inputs'))
        batch_op.drop_column('inputs')
