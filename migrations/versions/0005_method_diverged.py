"""method_results.diverged: why a method's meta-training stopped (it then has no ARG)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('method_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('diverged', sa.Text(), nullable=True))


def downgrade() -> None:
    diverged = op.get_bind().execute(sa.text("SELECT count(*) FROM method_results WHERE diverged IS NOT NULL")).scalar()
    if diverged:  # refuse rather than drop why those methods have no ARG
        raise RuntimeError(f"cannot downgrade below 0005: {diverged} method results record a diverged meta-training "
                           "that 0004 cannot store; delete those jobs first")
    with op.batch_alter_table('method_results', schema=None) as batch_op:
        batch_op.drop_column('diverged')
