"""scores.inputs: a digest of what a PT or FT run computed from, so later jobs can reuse it;
scores.reused_from: the job whose run a reused one is

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
        batch_op.add_column(sa.Column('reused_from', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_scores_inputs'), ['inputs'], unique=False)


def downgrade() -> None:
    reused = op.get_bind().execute(sa.text("SELECT count(*) FROM scores WHERE reused_from IS NOT NULL")).scalar()
    if reused:  # refuse rather than drop where those runs came from (the digests alone are only for reuse)
        raise RuntimeError(f"cannot downgrade below 0006: {reused} scores were reused from earlier jobs and 0005 "
                           "cannot record that; delete those jobs first")
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_column('reused_from')
        batch_op.drop_index(batch_op.f('ix_scores_inputs'))
        batch_op.drop_column('inputs')
