"""Engines and the short transactions flask-scoria runs on them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from .errors import StorageError


def create_standalone_engine(
    uri: str, *, busy_timeout: float, synchronous: str, engine_options: dict[str, Any]
) -> Engine:
    """Create flask-scoria's own engine for ``SCORIA_DATABASE_URI``.

    SQLite files get WAL journaling, the configured ``synchronous`` level and a
    busy timeout; nothing connects until the first query.
    """
    options = dict(engine_options)
    if uri.startswith("sqlite"):
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("timeout", busy_timeout)
        connect_args.setdefault("check_same_thread", False)
        options["connect_args"] = connect_args
    engine = create_engine(uri, **options)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, synchronous)
    return engine


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    memory = engine.url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


class Storage:
    """Runs flask-scoria's own short transactions on one engine.

    Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that two
    writers never deadlock on a lock upgrade; on PostgreSQL they run at the
    engine's isolation level, since every transition is a compare-and-set.
    Database errors leave as :class:`StorageError`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn SQLAlchemy's and the driver's own errors into :class:`StorageError`."""
        try:
            yield
        except (SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error) as exc:
            reason = _first_line(exc)
            raise StorageError(
                "The flask-scoria database is unavailable:"
                f" {type(exc).__name__}: {reason}{_hint(reason)}"
            ) from exc

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction, committed on success."""
        with self._errors(), self.engine.connect() as conn:
            conn.begin()
            if self.is_sqlite:
                conn.connection.cursor().execute("BEGIN IMMEDIATE").close()
            yield conn
            conn.commit()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads; nothing it does is committed."""
        with self._errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A connection whose queries all see the database at one moment."""
        with self._errors(), self.engine.connect() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN")
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            yield conn


def _hint(reason: str) -> str:
    """What to do about the common causes of ``reason``."""
    if "scoria_" in reason and ("no such table" in reason or "does not exist" in reason):
        return ". The scoria_* tables are missing: run `flask scoria db upgrade`."
    if "database is locked" in reason:
        return (
            ". Another connection held SQLite's write lock past the busy timeout; with"
            " Scoria(app, db=db), commit or roll back db.session before calling flask-scoria."
        )
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__
