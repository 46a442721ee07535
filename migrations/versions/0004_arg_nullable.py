"""method_results.arg may be null: a method's ARG where PT scored 0 on every target task

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('method_results', schema=None) as batch_op:
        batch_op.alter_column('arg', existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    undefined = op.get_bind().execute(sa.text("SELECT count(*) FROM method_results WHERE arg IS NULL")).scalar()
    if undefined:  # refuse rather than drop stored results
        raise RuntimeError(f"cannot downgrade below 0004: {undefined} method results have no ARG (PT scored 0 "
                           "on every target task) and 0003 cannot store that; delete those jobs first")
    with op.batch_alter_table('method_results', schema=None) as batch_op:
        batch_op.alter_column('arg', existing_type=sa.Float(), nullable=False)
