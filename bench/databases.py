"""Throwaway, migrated databases for the benches."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from flask_scoria import schema

POSTGRES_URL = os.environ.get(
    "SCORIA_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    """A fresh migrated database of ``backend``, dropped afterwards."""
    if backend == "sqlite":
        uri = f"sqlite:///{workdir / f'{uuid.uuid4().hex}.sqlite3'}"
        engine = sa.create_engine(uri)
        schema.upgrade(engine)
        engine.dispose()
        yield uri
        return
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"scoria_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    uri = sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine = sa.create_engine(uri)
        schema.upgrade(engine)
        engine.dispose()
        yield uri
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
