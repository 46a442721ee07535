"""events.id: a 64-bit integer (a 32-bit id runs out after 2^31 events)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # SQLite's rowid is 64-bit already
        op.alter_column('events', 'id', type_=sa.BigInteger(), existing_type=sa.Integer())
        op.execute("ALTER SEQUENCE events_id_seq AS bigint MAXVALUE 9223372036854775807")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER SEQUENCE events_id_seq AS integer MAXVALUE 2147483647")
        op.alter_column('events', 'id', type_=sa.Integer(), existing_type=sa.BigInteger())
