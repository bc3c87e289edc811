"""Alembic environment of flask-scoria's own revision history."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from flask_scoria.schema import VERSION_TABLE, metadata, only_scoria_tables

config = context.config


def _configure_and_run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=only_scoria_tables,
        compare_type=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _configure_and_run(connection)
else:
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.begin() as conn:
        _configure_and_run(conn)
