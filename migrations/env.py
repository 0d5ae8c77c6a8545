"""Alembic environment: migrates the lineage DB named by the caller's config."""

from __future__ import annotations

from alembic import context
from daemon.db.engine import make_engine
from daemon.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from daemon.config import load_settings

    return load_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch "move and copy" and table drops must not cascade or fail on populated tables;
            # the pragma only takes effect outside a transaction, hence the raw DBAPI call.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        # Batch mode: SQLite can only ALTER tables by "move and copy".
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
