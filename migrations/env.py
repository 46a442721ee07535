"""Alembic environment: the URL comes from the config (core.store.Store sets it) or from
PRIMER_DATABASE_URL; the target metadata is core.store.models'."""
from alembic import context
from sqlalchemy import engine_from_config, pool

from core.settings import settings
from core.store.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or settings().db_url()


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things, so Alembic copies the table there
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
