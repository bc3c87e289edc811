"""Engines and the short transactions flask-scoria runs on them."""

from __future__ import annotations

import math
import os
import random
import re
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import cached_property
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError, StatementError

from .errors import StorageError

#: Seconds before the first try again after a dropped connection; doubled each time.
RECONNECT_DELAY = 0.05
RECONNECT_MAX_DELAY = 2.0
#: A pooled connection that sat unused this many seconds is pinged before it is lent out.
PING_AFTER_IDLE = 1.0
#: SQLSTATEs of a lost connection: connection exceptions, and the server shutting down.
_LOST = ("08", "57P01", "57P02", "57P03")
#: The key of a pooled connection's info under which flask-scoria's statements keep their
#: idle cursors: only on the own engine's PostgreSQL connections, which nothing else uses.
KEPT_CURSORS = "scoria_cursors"


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
    (see :func:`ping_when_idle`). SQLite files get WAL
    journaling, the configured ``synchronous`` level and a busy timeout;
    PostgreSQL connections get a connect timeout and a statement timeout
    (``0``: none), and a place to keep the runtime's idle cursors
    (:data:`KEPT_CURSORS`). ``engine_options`` win over all of these.
    Nothing connects until the first query.
    """
    options = dict(engine_options)
    connect_args = dict(options.pop("connect_args", {}))
    url = make_url(uri)
    backend = url.get_backend_name()
    if backend == "sqlite":
        connect_args.setdefault("timeout", busy_timeout)
        connect_args.setdefault("check_same_thread", False)
    elif backend == "postgresql":
        if "connect_timeout" not in url.query:
            # libpq takes whole seconds, and treats less than 2 as 2.
            connect_args.setdefault("connect_timeout", max(2, math.ceil(connect_timeout)))
        connect_args.setdefault("options", _server_options(url, statement_timeout))
    options["connect_args"] = connect_args
    engine = create_engine(uri, **options)
    _forget_pool_in_forked_children(engine)
    if engine.dialect.name == "sqlite":
        # A file has no server to close its connections: nothing to ping.
        _configure_sqlite(engine, synchronous, busy_timeout)
        return engine
    event.listen(engine, "connect", _keep_cursors)
    if "pool_pre_ping" not in options:
        ping_when_idle(engine)
    return engine


def _forget_pool_in_forked_children(engine: Engine) -> None:
    """Give a process forked from this one (a pre-forking server's worker) a pool of its
    own: the connections it inherits stay the parent's, unused and unclosed by it."""
    if not hasattr(os, "register_at_fork"):  # no fork on Windows
        return
    forked = weakref.ref(engine)

    def in_child() -> None:
        engine = forked()
        if engine is not None:
            engine.dispose(close=False)

    os.register_at_fork(after_in_child=in_child)


def _server_options(url: URL, statement_timeout: float) -> str:
    """The URL's own ``options`` (a ``search_path``, say), with the statement timeout
    unless they set one."""
    given = url.query.get("options") or ()
    text = given if isinstance(given, str) else " ".join(given)
    if "statement_timeout" in text:
        return text
    milliseconds = math.ceil(statement_timeout * 1000)
    return f"{text} -c statement_timeout={milliseconds}".strip()


def _keep_cursors(_dbapi_connection: Any, record: Any) -> None:
    """Give a new connection of the own engine a place for its idle cursors (SQLAlchemy
    empties a connection's info when it replaces the connection)."""
    record.info[KEPT_CURSORS] = {}


def ping_when_idle(engine: Engine, idle: float = PING_AFTER_IDLE) -> None:
    """Ping a pooled connection before lending it out, if it may have gone stale.

    That is when it sat in the pool for ``idle`` seconds or more, or since a
    connection of the pool was found dropped (a server restart or failover
    drops them all). A busy pool skips the ping that ``pool_pre_ping`` would
    cost on every checkout: a round trip of the three or so of a transition.
    A connection that drops in use anyway is replaced, and the write tried
    again (:meth:`Storage.retry_after`).
    """
    dropped_at = [0.0]

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["scoria_returned_at"] = time.monotonic()

    @event.listens_for(engine, "invalidate")
    def _dropped(_dbapi_connection: Any, _record: Any, _exception: Any) -> None:
        dropped_at[0] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _lent(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("scoria_returned_at")
        if returned is None or (time.monotonic() - returned < idle and returned > dropped_at[0]):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool replaces the connection and lends out another.
            raise DisconnectionError(str(exc)) from exc


#: The ``synchronous`` levels at which a commit in WAL mode waits for the disk.
_SYNCED_COMMITS = ("FULL", "EXTRA")
#: The key under which a SQLite connection's info keeps the ``synchronous`` level that a
#: commit which need not wait for the disk relaxes, and returns to.
_RELAXABLE_LEVEL = "scoria_synchronous"


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout: float) -> None:
    memory = engine.url.database in (None, "", ":memory:")
    path = None if memory or engine.url.query.get("uri") else engine.url.database
    if path is not None:
        # As the driver opens it: made absolute once, not against each later working folder.
        _reopen_a_replaced_file(engine, os.path.abspath(path))

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        wal = False
        if not memory:
            try:
                wal = _journal_in_wal(cursor, busy_timeout, engine.dialect.loaded_dbapi.Error)
            except engine.dialect.loaded_dbapi.OperationalError as exc:
                # A file this process may only read can still be read, in its own mode;
                # a write then fails with the hint of _hint().
                if "readonly" not in str(exc):
                    raise
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        if wal and synchronous in _SYNCED_COMMITS:
            # The level a transaction that need not wait for the disk returns to.
            record.info[_RELAXABLE_LEVEL] = synchronous


#: The key of a pooled SQLite connection's info that holds the identity of its file.
_OPENED_FILE = "scoria_opened_file"


def _reopen_a_replaced_file(engine: Engine, path: str) -> None:
    """Retire a pooled connection whose SQLite file was deleted or replaced since it
    opened it, rather than lend it out: its writes would go to a file nobody else
    reads, and be lost with it. The next connection opens what is at ``path`` now."""

    @event.listens_for(engine, "connect")
    def _opened(_dbapi_connection: Any, record: Any) -> None:
        record.info[_OPENED_FILE] = _file_identity(path)

    @event.listens_for(engine, "checkout")
    def _lent(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        opened = record.info.get(_OPENED_FILE)
        if opened is not None and _file_identity(path) != opened:
            raise DisconnectionError(f"The SQLite file {path} was deleted or replaced.")


def _file_identity(path: str) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``; ``None`` if there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _journal_in_wal(cursor: Any, busy_timeout: float, error: type[Exception]) -> bool:
    """Put the SQLite file in WAL mode; return whether it is.

    Processes that open a file in another mode at the same moment each need it alone
    to change it, and SQLite refuses them at once rather than wait for the others:
    this tries again, for as long as the busy timeout lets a write wait.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return bool(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal")
        except error as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.005, 0.02))


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
        self.pipelines = _has_pipeline(engine)

    @cached_property
    def relaxes_at_begin(self) -> bool:
        """Whether a commit that need not wait for the disk must be told so at ``BEGIN``.

        True on a SQLite file of the own engine in WAL mode whose commits wait
        for the disk, whose level can change only before ``BEGIN`` (with
        ``write(flush=False)``). PostgreSQL can be told until the commit.
        """
        if not self.is_sqlite:
            return False
        with self._errors(), self.engine.connect() as conn:
            return _RELAXABLE_LEVEL in conn.connection.info

    def retry_after(self, exc: StorageError, tries: int) -> bool:
        """Whether to try a write again after its ``tries``-th failure ``exc``.

        Only a dropped connection is worth another try, and only a bounded
        number of times; this waits (exponential backoff, with jitter) before
        saying yes. A dropped commit may have been applied: the retried write
        must find out, as a compare-and-set does.
        """
        if not dropped_connection(exc) or tries > self.reconnect_attempts:
            return False
        # Doubling stops long before RECONNECT_MAX_DELAY; any number of tries stays a float.
        delay = min(RECONNECT_MAX_DELAY, RECONNECT_DELAY * 2 ** min(tries - 1, 32))
        time.sleep(random.uniform(delay / 2, delay))
        return True

    def _errors(self) -> AbstractContextManager[None]:
        return storage_errors(self.engine)

    @contextmanager
    def write(self, *, pipeline: bool = False, flush: bool = True) -> Iterator[Connection]:
        """A connection in a write transaction, committed on success.

        Without ``flush``, the commit does not wait for the disk: on
        PostgreSQL (:func:`commit_without_waiting`), and on a SQLite file in
        WAL mode whose commits wait for it (``synchronous`` ``FULL`` or
        ``EXTRA``; ``NORMAL`` for this transaction). The next commit that
        waits writes it to disk as well. A pipelined transaction decides in
        its statements instead (see :class:`~.runtime.statements.Batch`).

        With ``pipeline`` on PostgreSQL (psycopg), the transaction runs in
        psycopg's pipeline mode: its ``BEGIN`` travels with the first
        statement, and writes whose results nobody reads wait to travel with
        the ``COMMIT``, so that a transition costs a round trip per read and
        one for its commit. Its queries must then read their results from the
        DBAPI cursor, as the runtime's prepared statements do: SQLAlchemy's
        results do not work in pipeline mode.
        """
        with self._errors(), self.engine.connect() as conn:
            if pipeline and self.pipelines:
                with self._pipelined(conn) as pipelined:
                    yield pipelined
                return
            level = None if flush else conn.connection.info.get(_RELAXABLE_LEVEL)
            if level is not None:
                # SQLite changes the level only between transactions.
                conn.connection.cursor().execute("PRAGMA synchronous=NORMAL").close()
            try:
                conn.begin()
                if self.is_sqlite:
                    begin_sqlite(conn, "IMMEDIATE")
                elif not flush:
                    commit_without_waiting(conn)
                yield conn
                conn.commit()
            finally:
                if level is not None:
                    _restore_synchronous(conn, level)

    @contextmanager
    def _pipelined(self, conn: Connection) -> Iterator[Connection]:
        """``conn`` in one pipelined transaction, from ``BEGIN`` to ``COMMIT``."""
        error = self.engine.dialect.loaded_dbapi.Error
        # Autocommit leaves BEGIN and COMMIT to this block.
        with _autocommitting(conn) as driver:
            try:
                with driver.pipeline() as batch:
                    driver.execute("BEGIN")
                    try:
                        yield conn
                    except BaseException:
                        # Collect what an aborted pipeline still owes; ROLLBACK follows.
                        with suppress(error):
                            batch.sync()
                        raise
                    driver.execute("COMMIT")
            except error as exc:
                # Results, and their errors, arrive when the pipeline is synced.
                if _stuck(driver):
                    conn.invalidate(exc)
                raise database_error(conn, exc, "COMMIT", None, None) from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads, each query a statement of its own."""
        if self.is_sqlite:
            with self._errors(), self.engine.connect() as conn:
                yield conn
            return
        # No BEGIN and ROLLBACK around the queries: a read costs one round trip.
        with self.autocommit() as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A PostgreSQL connection whose every statement is a transaction of its own."""
        with self._errors(), self.engine.connect() as conn:
            if self.engine.dialect.driver != "psycopg":
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
                return
            with _autocommitting(conn):
                yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A connection whose queries all see the database at one moment."""
        with self._errors(), self.engine.connect() as conn:
            if self.is_sqlite:
                conn.begin()
                begin_sqlite(conn, "DEFERRED")
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            yield conn


@contextmanager
def storage_errors(engine: Engine) -> Iterator[None]:
    """Turn SQLAlchemy's and the driver's own errors on ``engine`` into :class:`StorageError`,
    with what to do about a known cause."""
    try:
        yield
    except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
        reason = _first_line(exc)
        hint = _hint(reason, engine)
        raise StorageError(
            f"The flask-scoria database is unavailable: {type(exc).__name__}: {reason}"
            + (f". {hint}" if hint else ""),
            hint=hint,
        ) from exc


def connect(engine: Engine) -> Connection:
    """A connection to ``engine``; one that cannot be opened (a SQLite file whose folder
    does not exist, a server that does not answer) raises :class:`StorageError`."""
    with storage_errors(engine):
        return engine.connect()


def begin_sqlite(conn: Connection, mode: str) -> None:
    """Start the SQLite transaction of ``conn``, which SQLAlchemy has begun, in ``mode``
    (``IMMEDIATE``: holding the write lock from the start).

    pysqlite leaves ``BEGIN`` to its first write. A host engine that sends its own
    on SQLAlchemy's ``begin`` event (SQLAlchemy's recipe for pysqlite) has
    already started one, deferred and empty: it is committed first, since SQLite
    cannot start a transaction inside another.
    """
    driver: Any = conn.connection.driver_connection
    cursor = driver.cursor()
    try:
        if driver.in_transaction:
            cursor.execute("COMMIT")
        cursor.execute(f"BEGIN {mode}")
    finally:
        cursor.close()


def _stuck(driver: Any) -> bool:
    """Whether a psycopg connection whose pipeline failed can no longer be used: it was
    lost, or its pipeline could not end (its connection broke while results were due,
    and psycopg says "cannot exit pipeline mode while busy")."""
    from psycopg import pq

    pgconn = driver.pgconn
    return bool(
        driver.closed
        or pgconn.status == pq.ConnStatus.BAD
        or pgconn.pipeline_status != pq.PipelineStatus.OFF
    )


@contextmanager
def _autocommitting(conn: Connection) -> Iterator[Any]:
    """The psycopg connection behind ``conn``, in autocommit for the block.

    Set on the driver's connection: SQLAlchemy's isolation level does the
    same at several times the cost, and undoes it on each return to the pool.
    The connection leaves the block in its own mode again, outside any
    transaction, or is retired (as a connection found lost already is).
    """
    driver: Any = conn.connection.driver_connection
    was = driver.autocommit
    driver.autocommit = True
    try:
        yield driver
    finally:
        if not conn.invalidated:
            _restore_autocommit(conn, driver, was)


def _restore_autocommit(conn: Connection, driver: Any, was: bool) -> None:
    """End what transaction ``driver`` is in and give it its mode back, or retire it."""
    try:
        status = driver.info.transaction_status
        if status != type(status).IDLE:
            driver.rollback()
        driver.autocommit = was
    except conn.dialect.loaded_dbapi.Error:
        conn.invalidate()


#: The expression that lets the PostgreSQL transaction it runs in, alone (an implicit one
#: included), commit without waiting for the disk.
COMMIT_WITHOUT_WAITING = "set_config('synchronous_commit', 'off', true)"


def commit_without_waiting(conn: Connection) -> None:
    """Let the PostgreSQL transaction of ``conn``, alone, commit without waiting for the disk."""
    conn.exec_driver_sql(f"SELECT {COMMIT_WITHOUT_WAITING}")


def dropped_connection(exc: StorageError) -> bool:
    """Whether ``exc`` is a connection that dropped: what was sent on it may have been applied."""
    cause = exc.__cause__
    return isinstance(cause, DBAPIError) and cause.connection_invalidated


def _restore_synchronous(conn: Connection, level: str) -> None:
    """Give a SQLite connection its ``synchronous`` level back, or retire it."""
    try:
        conn.rollback()
        conn.connection.cursor().execute(f"PRAGMA synchronous={level}").close()
    except (SQLAlchemyError, conn.dialect.loaded_dbapi.Error):
        # Never lend out a connection whose commits would not wait for the disk.
        conn.invalidate()


def _has_pipeline(engine: Engine) -> bool:
    """Whether ``engine`` connects with psycopg on a libpq that has pipeline mode (14+)."""
    if engine.dialect.driver != "psycopg":
        return False
    import psycopg

    return psycopg.capabilities.has_pipeline()


def database_error(
    conn: Connection, exc: Any, sql: str, params: Any, cursor: Any
) -> StatementError:
    """The :class:`DBAPIError` SQLAlchemy would raise for ``exc``; invalidates a lost connection."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    # A server shutting the connection down may say so before the socket closes.
    invalidated = (
        conn.invalidated
        or sqlstate.startswith(_LOST)
        or conn.dialect.is_disconnect(exc, conn.connection, cursor)
    )
    if invalidated and not conn.invalidated:
        conn.invalidate(exc)
    error: StatementError = DBAPIError.instance(
        sql,
        params,
        exc,
        conn.dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=conn.dialect,
    )
    return error


def _hint(reason: str, engine: Engine) -> str | None:
    """What to do about the common causes of ``reason``, an error on ``engine``: the
    only place that says so, for the runtime's calls and the migrations alike."""
    missing = ("no such table: scoria_", 'relation "scoria_', 'type "scoria_')
    if any(what in reason for what in missing) and (
        "no such table" in reason or "does not exist" in reason
    ):
        return "The scoria_* tables are missing: run `flask scoria db upgrade`."
    if "statement timeout" in reason:
        return (
            "A statement ran longer than SCORIA_STATEMENT_TIMEOUT allows: the database was"
            " busy, or another transaction held a lock the statement waited for."
        )
    if "unable to open database file" in reason:
        return _unopened_hint(engine)
    if "readonly database" in reason:
        path = _sqlite_file(engine.url)
        named = "The SQLite file" + (f" {path}" if path else "")
        return (
            f"{named} or its folder is read-only for this process (or opened with mode=ro):"
            " flask-scoria writes the file and creates its -wal and -shm files next to it."
        )
    if "database is locked" in reason:
        return (
            "Another connection held SQLite's write lock past the busy timeout; with"
            " Scoria(app, db=db), commit or roll back db.session before calling flask-scoria."
        )
    if "Connection refused" in reason or "could not translate host name" in reason:
        return (
            "No database server answered at the URL's host and port: start it, or correct"
            f" {_URL_SETTING}."
        )
    if re.search(r'\b(database|role) "[^"]*" does not exist', reason):
        return (
            "The server has no database or user of the URL's name: create it, or correct"
            f" {_URL_SETTING}."
        )
    if "password authentication failed" in reason:
        return f"The server refused the URL's user and password: correct {_URL_SETTING}."
    return None


#: Where the database's URL is set, with either engine.
_URL_SETTING = "SCORIA_DATABASE_URI (SQLALCHEMY_DATABASE_URI with Scoria(app, db=db))"


def _unopened_hint(engine: Engine) -> str:
    """Which SQLite file ``engine`` could not open, and what to do about it."""
    path = _sqlite_file(engine.url)
    if path is None:
        return f"SQLite could not open the database: correct {_URL_SETTING}."
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return (
            f"SQLite cannot open the file {path}: its folder {folder} does not exist."
            f" Create the folder, or correct the path in {_URL_SETTING}."
        )
    return (
        f"SQLite cannot open the file {path}: it is a folder, or it or its folder {folder}"
        f" cannot be read and written by this process. Correct the path in {_URL_SETTING},"
        " or the permissions."
    )


def _sqlite_file(url: URL) -> str | None:
    """The absolute path of the SQLite file ``url`` opens, as the driver resolves it
    now; ``None`` for another database, or one in memory."""
    if url.get_backend_name() != "sqlite":
        return None
    path = url.database or ""
    if path.startswith("file:") and url.query.get("uri") in ("true", "1"):
        parts = urlsplit(path)  # the driver passes the other options after a "?"
        if url.query.get("mode") == "memory" or "mode=memory" in parts.query:
            return None
        path = unquote(parts.path)
    if path in ("", ":memory:"):
        return None
    return os.path.abspath(path)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__
