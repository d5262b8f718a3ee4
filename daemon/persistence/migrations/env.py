"""Alembic environment: runs on the connection refreshd hands over (migrate.py beside it)."""

from __future__ import annotations

from alembic import context

from daemon.persistence.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `refreshd db upgrade`, not the alembic CLI")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
