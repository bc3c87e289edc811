"""Engines and the short transactions flask-scoria runs on them."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError

from .errors import StorageError

#: Seconds before the first try again after a dropped connection; doubled each time.
RECONNECT_DELAY = 0.05
RECONNECT_MAX_DELAY = 2.0
#: A pooled server connection idle for longer than this many seconds is pinged before use.
PING_AFTER_IDLE = 1.0


def create_standalone_engine(
    uri: str,
    *,
    busy_timeout: float,
    synchronous: str,
    engine_options: dict[str, Any],
    connect_timeout: float,
    statement_timeout: float,
) -> Engine:
    """Create flask-scoria's own engine for ``SCORIA_DATABASE_URI``.

    Pooled connections to a server are pinged before use when they sat idle
    for more than :data:`PING_AFTER_IDLE` seconds. SQLite files get WAL
    journaling, the configured ``synchronous`` level and a busy timeout;
    PostgreSQL connections get a connect timeout and a statement timeout
    (``0``: none). ``engine_options`` win over all of these. Nothing
    connects until the first query.
    """
    options = dict(engine_options)
    connect_args = dict(options.pop("connect_args", {}))
    backend = make_url(uri).get_backend_name()
    # A file has no server to close its connections.
    ping_when_idle = backend != "sqlite" and "pool_pre_ping" not in options
    if backend == "sqlite":
        connect_args.setdefault("timeout", busy_timeout)
        connect_args.setdefault("check_same_thread", False)
    elif backend == "postgresql":
        # libpq takes whole seconds, and treats less than 2 as 2.
        connect_args.setdefault("connect_timeout", max(2, math.ceil(connect_timeout)))
        milliseconds = math.ceil(statement_timeout * 1000)
        connect_args.setdefault("options", f"-c statement_timeout={milliseconds}")
    options["connect_args"] = connect_args
    engine = create_engine(uri, **options)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, synchronous)
    if ping_when_idle:
        _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use if it sat idle for more than ``PING_AFTER_IDLE``.

    ``pool_pre_ping`` pings on every checkout, a round trip per transaction.
    A server or a proxy closes connections that sat idle; one returned a
    moment ago is used without a ping, and if it dropped all the same, a write
    is retried (:meth:`Storage.retry_after`).
    """

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:  # None: it was invalidated
            record.info["scoria_returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _lent(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("scoria_returned")
        if returned is None or time.monotonic() - returned <= PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool replaces the connection and checks out again.
            raise DisconnectionError(str(exc)) from exc


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    memory = engine.url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            except engine.dialect.loaded_dbapi.OperationalError as exc:
                # A file this process may only read can still be read, in its own mode;
                # a write then fails with the hint of _hint().
                if "readonly" not in str(exc):
                    raise
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


class Storage:
    """Runs flask-scoria's own short transactions on one engine.

    Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that two
    writers never deadlock on a lock upgrade; on PostgreSQL they run at the
    engine's isolation level, since every transition is a compare-and-set.
    Database errors leave as :class:`StorageError`.

    A write whose connection dropped may be tried again on a fresh one, up
    to ``reconnect_attempts`` more times (:meth:`retry_after`).
    """

    def __init__(self, engine: Engine, *, reconnect_attempts: int = 3) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self.reconnect_attempts = reconnect_attempts

    def retry_after(self, exc: StorageError, tries: int) -> bool:
        """Whether to try a write again after its ``tries``-th failure ``exc``.

        Only a dropped connection is worth another try, and only a bounded
        number of times; this waits (exponential backoff, with jitter) before
        saying yes. A dropped commit may have been applied: the retried write
        must find out, as a compare-and-set does.
        """
        cause = exc.__cause__
        dropped = isinstance(cause, DBAPIError) and cause.connection_invalidated
        if not dropped or tries > self.reconnect_attempts:
            return False
        delay = min(RECONNECT_MAX_DELAY, RECONNECT_DELAY * 2 ** (tries - 1))
        time.sleep(random.uniform(delay / 2, delay))
        return True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn SQLAlchemy's and the driver's own errors into :class:`StorageError`."""
        try:
            yield
        except (SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error) as exc:
            reason = _first_line(exc)
            hint = _hint(reason)
            raise StorageError(
                f"The flask-scoria database is unavailable: {type(exc).__name__}: {reason}"
                + (f". {hint}" if hint else ""),
                hint=hint,
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


def _hint(reason: str) -> str | None:
    """What to do about the common causes of ``reason``."""
    if "scoria_" in reason and ("no such table" in reason or "does not exist" in reason):
        return "The scoria_* tables are missing: run `flask scoria db upgrade`."
    if "readonly database" in reason or "unable to open database file" in reason:
        return (
            "The SQLite file, or its folder, is read-only for this process (or opened with"
            " mode=ro): flask-scoria writes the file and creates its -wal and -shm files next"
            " to it."
        )
    if "database is locked" in reason:
        return (
            "Another connection held SQLite's write lock past the busy timeout; with"
            " Scoria(app, db=db), commit or roll back db.session before calling flask-scoria."
        )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__
