"""Alembic environment of the run store.

``RunStore.open`` passes its own open connection in ``config.attributes["connection"]`` (inside a
transaction that holds the migration lock); the Alembic CLI gets an engine built from the store's
URL (``BCD_DATABASE_URL`` or the project's ``results.db``) and migrates in a
:func:`~bcd_engine.store.engine.migration_transaction` too (on SQLite: foreign keys off).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from bcd_engine.settings import database_url
from bcd_engine.store.engine import make_engine, migration_transaction, normalize_url
from bcd_engine.store.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = normalize_url(context.config.get_main_option("sqlalchemy.url") or database_url())
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn, migration_transaction(conn):
            _run(conn)
    finally:
        engine.dispose()


main()
