"""Alembic environment of the example's own tables, driven by Flask-Migrate.

``Migrate(..., include_name=flask_scoria.include_name)`` reaches
``context.configure`` through ``configure_args``, so autogenerate never
proposes dropping the ``scoria_*`` tables that share this database.
"""

from alembic import context
from flask import current_app

migrate = current_app.extensions["migrate"]

with migrate.db.engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=migrate.db.metadata,
        **migrate.configure_args,
    )
    with context.begin_transaction():
        context.run_migrations()
