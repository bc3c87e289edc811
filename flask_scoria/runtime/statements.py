"""The statements the runtime executes, built and compiled once.

Building a SQLAlchemy statement costs several times more than executing a
prepared one, and executing a compiled Core statement still costs several
times more than the database takes for the short statements of a transition.
So the hot statements are built here with bind parameters, compiled once per
dialect and set of parameters, and run on the connection's DBAPI cursor with
the column types' own bind and result processors. They run inside the
:class:`~sqlalchemy.engine.Connection` transactions of
:class:`~flask_scoria.storage.Storage`; database errors leave as
:class:`~sqlalchemy.exc.DBAPIError`, like those of Core statements.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property, lru_cache
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import (
    Boolean,
    Connection,
    Dialect,
    Select,
    Table,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ColumnElement

from ..statuses import ApprovalStatus, StepStatus
from ..storage import COMMIT_WITHOUT_WAITING, KEPT_CURSORS, database_error
from .tables import (
    APPROVALS_NEWEST_FIRST,
    Row,
    RowLike,
    approvals,
    events,
    handoffs,
    runs,
    steps,
)

Processor = Callable[[Any], Any] | None
T = TypeVar("T")

#: A write that must change exactly one row, checked by the database: when it
#: changes none, the division fails and aborts the transaction, its commit with it.
_GUARD = "WITH changed AS ({} RETURNING 1) SELECT 1 / count(*) FROM changed"
#: The SQLSTATE of that failure (``division_by_zero``).
_UNMATCHED = "22012"
#: SQLSTATEs of a transaction aborted for a concurrent one: ``serialization_failure``
#: and ``deadlock_detected``.
_LOST_RACE = ("40001", "40P01")


class Conflict(Exception):
    """Another transaction changed the run first; read it again."""


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: tuple[str, ...] | None
    defaults: Row
    binds: tuple[tuple[str, Callable[[Any], Any]], ...]
    columns: tuple[tuple[str, Processor], ...]

    @cached_property
    def native(self) -> tuple[str, tuple[str, ...]]:
        """The ``pyformat`` SQL with PostgreSQL's own ``$n`` placeholders, and the name
        of the parameter each one stands for.

        psycopg sends it as it is: a ``pyformat`` statement is parsed again on every
        execution once it is longer than psycopg caches (4,096 characters), as the
        largest transitions are.
        """
        numbers: dict[str, int] = {}

        def placeholder(match: re.Match[str]) -> str:
            name = match.group(1)
            return "%" if name is None else f"${numbers.setdefault(name, len(numbers) + 1)}"

        return _PYFORMAT.sub(placeholder, self.sql), tuple(numbers)

    def parameters(self, values: RowLike) -> Any:
        processed = {**self.defaults, **values}
        for name, processor in self.binds:
            value = processed[name]
            if value is not None:
                processed[name] = processor(value)
        if self.positional is None:
            return processed
        return tuple([processed[name] for name in self.positional])

    def row(self, values: Sequence[Any]) -> Row:
        return {
            name: value if processor is None or value is None else processor(value)
            for (name, processor), value in zip(self.columns, values, strict=True)
        }


class Prepared:
    """A statement compiled once per dialect and run on the DBAPI cursor.

    Parameters are plain dicts keyed by column key (for the columns an INSERT
    or UPDATE writes) and by bind parameter name.
    """

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        #: Whether it changes rows (an INSERT, UPDATE or DELETE).
        self.writes: bool = statement.is_dml
        #: The table it writes, if it does.
        self.table: str | None = statement.table.name if statement.is_dml else None  # type: ignore[attr-defined]
        #: Whether it inserts rows (only these may share a statement with another write
        #: of their table, see :class:`Batch`).
        self.inserts: bool = getattr(statement, "is_insert", False)
        self._compiled: dict[tuple[str, frozenset[str], bool], _Compiled] = {}

    def _compile(self, dialect: Dialect, keys: frozenset[str], guard: bool = False) -> _Compiled:
        cache_key = (dialect.name, keys, guard)
        compiled = self._compiled.get(cache_key)
        if compiled is None:
            compiled = _compile(self.statement, dialect, keys)
            if guard:
                compiled = replace(compiled, sql=_GUARD.format(compiled.sql))
            self._compiled[cache_key] = compiled
        return compiled

    def execute(self, conn: Connection, params: RowLike) -> Any:
        """Execute with one set of parameters; return the DBAPI cursor."""
        compiled = self._compile(conn.dialect, frozenset(params))
        return _run(conn, compiled, compiled.parameters(params), many=False)

    def execute_many(self, conn: Connection, rows: Sequence[RowLike]) -> None:
        """Execute once per row of parameters (all with the same keys)."""
        compiled = self._compile(conn.dialect, frozenset(rows[0]))
        if len(rows) == 1:
            _release(conn, compiled, _run(conn, compiled, compiled.parameters(rows[0]), many=False))
        else:
            values = [compiled.parameters(row) for row in rows]
            _release(conn, compiled, _run(conn, compiled, values, many=True))

    def rowcount(self, conn: Connection, params: RowLike) -> int:
        """Execute and return how many rows the statement changed."""
        compiled = self._compile(conn.dialect, frozenset(params))
        cursor = _run(conn, compiled, compiled.parameters(params), many=False)
        count: int = cursor.rowcount
        _release(conn, compiled, cursor)
        return count

    def expect_one(self, conn: Connection, params: RowLike, *, defer: bool = False) -> None:
        """Execute a write that must change exactly one row; raise :class:`Conflict` if not.

        On PostgreSQL the database checks it, aborting the transaction when it
        fails. With ``defer`` nothing waits for that check: in a pipeline the
        statement travels with the next read or the commit, and its failure
        (see :func:`unmatched`) surfaces there.
        """
        if conn.dialect.name != "postgresql":
            if self.rowcount(conn, params) != 1:
                raise Conflict
            return
        compiled = self._compile(conn.dialect, frozenset(params), guard=True)
        try:
            cursor = _run(conn, compiled, compiled.parameters(params), many=False)
            if not defer:
                _fetch(conn, compiled, cursor.fetchone)
        except DBAPIError as exc:
            if unmatched(exc):
                raise Conflict from None
            raise
        _release(conn, compiled, cursor)

    def send(self, conn: Connection, params: RowLike) -> Sent:
        """Execute; in a pipeline, the result is read only when asked for."""
        compiled = self._compile(conn.dialect, frozenset(params))
        return Sent(conn, compiled, _run(conn, compiled, compiled.parameters(params), many=False))

    def first(self, conn: Connection, params: RowLike) -> Row | None:
        """The first row of the result as a dict keyed by column key, or ``None``."""
        return self.send(conn, params).first()

    def all(self, conn: Connection, params: RowLike) -> list[Row]:
        """Every row of the result as dicts keyed by column key."""
        return self.send(conn, params).all()


@dataclass
class Sent:
    """A statement sent to the database, whose rows are read once."""

    conn: Connection
    compiled: _Compiled
    cursor: Any

    def first(self) -> Row | None:
        """The first row of the result as a dict keyed by column key, or ``None``."""
        values = _fetch(self.conn, self.compiled, self.cursor.fetchone)
        _release(self.conn, self.compiled, self.cursor)
        self.cursor = None  # the cursor may run another statement now
        return None if values is None else self.compiled.row(values)

    def all(self) -> list[Row]:
        """Every row of the result as dicts keyed by column key."""
        rows = _fetch(self.conn, self.compiled, self.cursor.fetchall)
        _release(self.conn, self.compiled, self.cursor)
        self.cursor = None
        return [self.compiled.row(values) for values in rows]


@dataclass
class _Held:
    """A write a :class:`Batch` holds: its compiled form and processed parameters."""

    statement: Prepared
    compiled: _Compiled
    params: dict[str, Any]
    guarded: bool


class Batch:
    """Writes held back to reach PostgreSQL as one statement of data-modifying CTEs.

    The writes of a transition each cost the driver and the server a
    statement; held here, they leave as one when :meth:`send` is called,
    before the transaction's next read and before its commit. A guarded
    write (one that must change exactly one row) fails the statement, and
    its transaction, when it changes none, as :meth:`Prepared.expect_one`
    does with ``defer``. Sub-statements of one statement all see the
    database as it was before it, so an UPDATE never joins a statement that
    already writes its table: the held writes leave first. (No held write
    reads another table; one that did would need the same care.)

    Without ``flush``, the transaction's commit does not wait for
    PostgreSQL to write it to disk (``synchronous_commit`` is off for it
    alone); see :attr:`~.transaction.RunChange.flushes`.
    """

    def __init__(self, conn: Connection, *, locking: uuid.UUID | None = None) -> None:
        self.conn = conn
        self._held: list[_Held] = []
        #: A ``NOTIFY`` channel to signal with the writes (on commit).
        self.notify: str | None = None
        #: The run a batch that is its own transaction locks before its updates.
        self.locking = locking
        #: Whether the transaction's commit waits for the disk.
        self.flush = True

    def add(self, statement: Prepared, params: RowLike, *, guarded: bool = False) -> None:
        """Hold a write of ``statement`` with ``params``.

        A batch ``locking`` a run is sent once, whole: a write it cannot join
        raises :class:`NotAlone`.
        """
        if not statement.inserts and any(h.statement.table == statement.table for h in self._held):
            if self.locking is not None:
                raise NotAlone
            self.send()
        compiled = statement._compile(self.conn.dialect, frozenset(params))
        self._held.append(_Held(statement, compiled, compiled.parameters(params), guarded))

    def send(self) -> None:
        """Send the held writes, the ``NOTIFY`` and the commit's level as one statement;
        nothing waits for its answer."""
        held, self._held = self._held, []
        if not held and self.notify is None and self.flush:
            return
        locking = self.locking is not None
        shape = _Shape(
            tuple((each.compiled.sql, each.guarded) for each in held),
            self.notify,
            locking,
            self.flush,
        )
        combined = _COMBINED.get(shape)
        if combined is None:
            if len(_COMBINED) >= _COMBINED_MAX:
                _COMBINED.clear()
            combined = _COMBINED[shape] = _combine(
                held, self.notify, locking=locking, flush=self.flush
            )
        params = {
            f"w{index}_{name}": value
            for index, each in enumerate(held)
            for name, value in each.params.items()
        }
        if locking:
            params["locked_run_id"] = self.locking
        _release(self.conn, combined, _run(self.conn, combined, params, many=False))


class NotAlone(Exception):
    """A write cannot join the others in one statement: the change needs a transaction."""


class _Shape(NamedTuple):
    """What a statement of :class:`Batch` is made of: its key in the cache of statements."""

    #: The SQL of each write, and whether it is guarded.
    writes: tuple[tuple[str, bool], ...]
    #: The ``NOTIFY`` channel to signal, if any.
    notify: str | None
    #: Whether the statement locks a run first.
    locking: bool
    #: Whether the transaction's commit waits for the disk.
    flush: bool


#: The statements :class:`Batch` sent, by the shape of what they combine.
_COMBINED: dict[_Shape, _Compiled] = {}
#: How many shapes are kept; the transitions make a few dozen.
_COMBINED_MAX = 512
_PARAMETER = re.compile(r"%\((\w+)\)s")
#: A ``pyformat`` placeholder, or an escaped ``%``.
_PYFORMAT = re.compile(r"%\((\w+)\)s|%%")
#: How many idle cursors a connection keeps at most (:func:`_release`); the least recently
#: used one goes first.
_KEPT_CURSORS_MAX = 64


#: The first part of a statement that is its own transaction: the run's lock.
_LOCKED_RUN = "locked_run AS (SELECT 1 FROM scoria_runs WHERE id = %(locked_run_id)s FOR UPDATE)"


def _combine(
    held: Sequence[_Held], notify: str | None, *, locking: bool = False, flush: bool = True
) -> _Compiled:
    """One statement doing every write of ``held`` (pyformat parameters, as psycopg's).

    ``locking``: the statement locks the run ``locked_run_id`` first, as every
    transaction does before any of its steps: each UPDATE needs that lock
    before it may touch a row. Without ``flush``, its transaction's commit
    does not wait for the disk.
    """
    ctes: list[str] = [_LOCKED_RUN] if locking else []
    checks: list[str] = []
    for index, each in enumerate(held):
        text = _PARAMETER.sub(rf"%(w{index}_\1)s", each.compiled.sql)
        if locking and not each.statement.inserts:
            assert " WHERE " in text, text
            text += " AND EXISTS (SELECT FROM locked_run)"
        previous = held[index - 1] if index else None
        row = None if each.guarded else _values_row(text)
        if (
            row is not None
            and previous is not None
            and previous.compiled is each.compiled
            and not previous.guarded
        ):
            # Another row of the same INSERT: one more row of its VALUES list.
            ctes[-1] = f"{ctes[-1][:-1]}, {row})"
            continue
        name = f"w{index}"
        if each.guarded:
            ctes.append(f"{name} AS ({text} RETURNING 1)")
            checks.append(f"1 / (SELECT count(*) FROM {name})")
        else:
            ctes.append(f"{name} AS ({text})")
    if notify is not None:
        checks.append(f"pg_notify('{notify}', '')")
    if not flush:
        checks.append(COMMIT_WITHOUT_WAITING)
    select_list = ", ".join(checks) or "1"
    statement = f"WITH {', '.join(ctes)} SELECT {select_list}" if ctes else f"SELECT {select_list}"
    return _Compiled(sql=statement, positional=None, defaults={}, binds=(), columns=())


def _values_row(sql: str) -> str | None:
    """The one row of ``INSERT ... VALUES (...)`` with nothing after it, else ``None``."""
    if not sql.startswith("INSERT "):
        return None
    _, found, row = sql.partition(" VALUES ")
    if not found or " ON CONFLICT " in row or " RETURNING " in row or not row.endswith(")"):
        return None
    return row


def _compile(statement: ClauseElement, dialect: Dialect, keys: frozenset[str]) -> _Compiled:
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=sorted(keys)))
    # One processor per name: a parameter used twice is processed once.
    processors = {
        name: processor
        for bind, name in compiled.bind_names.items()
        if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
    }
    binds = tuple(processors.items())
    # A SELECT's columns, or those an INSERT or UPDATE returns (none without RETURNING).
    selected: Iterable[Any] = getattr(
        statement, "selected_columns", getattr(statement, "exported_columns", ())
    )
    columns = tuple(
        (column.key, column.type.dialect_impl(dialect).result_processor(dialect, None))
        for column in selected
    )
    return _Compiled(
        sql=compiled.string,
        positional=None if compiled.positiontup is None else tuple(compiled.positiontup),
        defaults=dict(compiled.params),
        binds=binds,
        columns=columns,
    )


def _run(conn: Connection, compiled: _Compiled, params: Any, *, many: bool) -> Any:
    dbapi_connection = conn.connection
    native = None
    if compiled.positional is None and conn.dialect.driver == "psycopg":
        driver: Any = dbapi_connection.driver_connection
        native = _native_cursor(driver.cursor_factory)
    if native is not None:
        sql, names = compiled.native
        kept = dbapi_connection.info.get(KEPT_CURSORS)
        cursor = None if kept is None else kept.pop(sql, None)
        if cursor is None:
            cursor = native(driver)
        if many:
            values: Any = [tuple([row[name] for name in names]) for row in params]
        else:
            values = tuple([params[name] for name in names])
    else:
        cursor = dbapi_connection.cursor()
        sql, values = compiled.sql, params
    try:
        if many:
            cursor.executemany(sql, values)
        else:
            cursor.execute(sql, values)
    except conn.dialect.loaded_dbapi.Error as exc:
        cursor.close()
        raise database_error(conn, exc, compiled.sql, params, cursor) from exc
    return cursor


def _release(conn: Connection, compiled: _Compiled, cursor: Any) -> None:
    """Done with a cursor of :func:`_run`: keep a native one for its statement's next run.

    A psycopg cursor that runs the same statement text again keeps the
    adapters it chose for its parameters and result columns; a new cursor
    looks them all up again, the largest part of the client's work for a
    transition's statement. Kept on the own engine's connections only
    (:data:`~flask_scoria.storage.KEPT_CURSORS`): a host's code could change
    a shared connection's adapters or encoding, which a kept cursor would
    not see. The kept cursor holds no result. Outside pipeline mode only: a
    pipelined statement's result arrives later.
    """
    if conn.closed or conn.invalidated:
        cursor.close()
        return
    dbapi_connection = conn.connection
    kept = dbapi_connection.info.get(KEPT_CURSORS)
    driver: Any = dbapi_connection.driver_connection
    if (
        kept is None
        or cursor.connection is not driver
        or type(cursor) is not _native_cursor(driver.cursor_factory)
        or driver.pgconn.pipeline_status
        or not _forget_result(cursor)
    ):
        cursor.close()
        return
    kept[compiled.native[0]] = cursor
    if len(kept) > _KEPT_CURSORS_MAX:
        kept.pop(next(iter(kept))).close()


def _forget_result(cursor: Any) -> bool:
    """Let a psycopg cursor drop its result and keep its adapters; ``False`` if it could not.

    Not psycopg's public API: the cursor's ``_reset`` and its adapters'
    ``Transformer``, which holds on to the last result as well. A psycopg
    that has neither, or takes them otherwise, closes its cursors as before.
    """
    try:
        cursor._reset()
        cursor._tx.set_pgresult(None, set_loaders=False)
    except Exception:
        return False
    return True


@lru_cache(maxsize=16)
def _native_cursor(factory: type) -> type | None:
    """psycopg's cursor class ``factory`` (the connection's, which may be instrumented),
    sending its queries with PostgreSQL's own placeholders, unparsed.

    ``None`` for a cursor class that builds its queries another way (psycopg's
    ``ClientCursor`` binds parameters in the client, a ``RawCursor`` takes ``$n``
    already), or where psycopg has no ``RawCursorMixin``: its statements go as
    ``pyformat``. Bounded: instrumentation may make a class per connection.
    """
    import psycopg

    try:
        # Not among psycopg's exports: the mixin psycopg.RawCursor is made of.
        from psycopg.raw_cursor import RawCursorMixin
    except ImportError:
        return None
    if not issubclass(factory, psycopg.Cursor) or issubclass(
        factory, psycopg.ClientCursor | RawCursorMixin
    ):
        return None
    return type(f"Native{factory.__name__}", (RawCursorMixin, factory), {})


def _fetch(conn: Connection, compiled: _Compiled, fetch: Callable[[], T]) -> T:
    """Read a result; in a pipeline, the error of an earlier statement may arrive here."""
    try:
        return fetch()
    except conn.dialect.loaded_dbapi.Error as exc:
        raise database_error(conn, exc, compiled.sql, None, None) from exc


def unmatched(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a deferred :meth:`Prepared.expect_one` that changed no row."""
    return sqlstate(exc) == _UNMATCHED


def lost_race(exc: BaseException) -> bool:
    """Whether the database aborted the transaction of ``exc`` for a concurrent one.

    A serialization failure (at ``REPEATABLE READ`` or ``SERIALIZABLE``) or a
    deadlock: the transaction may simply be tried again.
    """
    return sqlstate(exc) in _LOST_RACE


def unindexed(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as an expression no index holds (``column || ''``), for a condition to be
    checked on the rows another index finds.

    Without statistics of the tables (SQLite's, until ``ANALYZE``), a planner may
    start from the index of ``column`` and walk every row with that value (every
    running run, say) to find the few the query asks for.
    """
    return column.concat(literal_column("''"))


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the database error behind ``exc``, if there is one."""
    cause: BaseException | None = exc
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if state is not None:
            return str(state)
        cause = getattr(cause, "orig", None) or cause.__cause__
    return None


INSERT_RUN = Prepared(insert(runs).inline())
#: Insert a run unless its idempotency key is taken; its row count says which.
INSERT_RUN_IF_NEW = {
    "postgresql": Prepared(postgresql.insert(runs).on_conflict_do_nothing()),
    "sqlite": Prepared(sqlite.insert(runs).on_conflict_do_nothing()),
}
#: The run started with the idempotency key ``b_key`` for the tenant ``b_tenant``.
RUN_BY_TENANT_KEY = Prepared(
    select(runs).where(
        runs.c.tenant_id == bindparam("b_tenant"), runs.c.idempotency_key == bindparam("b_key")
    )
)
#: The run without a tenant started with the idempotency key ``b_key``.
RUN_BY_UNTENANTED_KEY = Prepared(
    select(runs).where(runs.c.tenant_id.is_(None), runs.c.idempotency_key == bindparam("b_key"))
)
INSERT_STEP = Prepared(insert(steps).inline())
INSERT_EVENTS = Prepared(insert(events).inline())
INSERT_APPROVAL = Prepared(insert(approvals).inline())
INSERT_HANDOFF = Prepared(insert(handoffs).inline())

_RUN_BY_ID = select(runs).where(runs.c.id == bindparam("b_run_id"))
RUN_BY_ID = Prepared(_RUN_BY_ID)
RUN_BY_ID_FOR_UPDATE = Prepared(_RUN_BY_ID.with_for_update())
UPDATE_RUN_IF_VERSION = Prepared(
    update(runs).where(runs.c.id == bindparam("b_run_id"), runs.c.version == bindparam("b_version"))
)

STEP_BY_ID = Prepared(select(steps).where(steps.c.id == bindparam("b_step_id")))
#: The run's queued steps that are due at ``b_now``, in order.
QUEUED_STEPS = Prepared(
    select(steps)
    .where(
        steps.c.run_id == bindparam("b_run_id"),
        steps.c.status == StepStatus.QUEUED,
        or_(steps.c.not_before.is_(None), steps.c.not_before <= bindparam("b_now")),
    )
    .order_by(steps.c.sequence)
)
STEP_COUNT = Prepared(
    select(func.count().label("count"))
    .select_from(steps)
    .where(steps.c.run_id == bindparam("b_run_id"))
)
OPEN_STEP_COUNT = Prepared(
    select(func.count().label("count"))
    .select_from(steps)
    .where(
        steps.c.run_id == bindparam("b_run_id"),
        steps.c.status != StepStatus.COMPLETED,
        steps.c.status != StepStatus.CANCELLED,
    )
)
RUNNING_STEPS_OF_RUN = Prepared(
    select(steps).where(
        steps.c.run_id == bindparam("b_run_id"), steps.c.status == StepStatus.RUNNING
    )
)

#: The run's pending approval that expired before ``b_now``, if any.
EXPIRED_APPROVAL_OF_RUN = Prepared(
    select(approvals)
    .where(
        approvals.c.run_id == bindparam("b_run_id"),
        approvals.c.status == ApprovalStatus.PENDING,
        approvals.c.expires_at < bindparam("b_now"),
    )
    .limit(1)
)

_CURRENT_STEP_ID = (
    select(runs.c.current_step_id).where(runs.c.id == bindparam("b_run_id")).scalar_subquery()
)
#: The current step of the run ``b_run_id``.
CURRENT_STEP_OF_RUN = Prepared(select(steps).where(steps.c.id == _CURRENT_STEP_ID))


def latest_approval_of_step(step_id: ColumnElement[Any]) -> Select[Any]:
    """The latest approval of the step ``step_id`` of the run ``b_run_id``."""
    return (
        select(approvals)
        .where(approvals.c.run_id == bindparam("b_run_id"), approvals.c.step_id == step_id)
        .order_by(*APPROVALS_NEWEST_FIRST)
        .limit(1)
    )


#: The latest approval of the current step of the run ``b_run_id``: the one it waits for,
#: or else the one it was decided on (its pending one is always on that step).
_LATEST_APPROVAL = latest_approval_of_step(_CURRENT_STEP_ID)
LATEST_APPROVAL = Prepared(_LATEST_APPROVAL)
#: Its id.
LATEST_APPROVAL_ID = _LATEST_APPROVAL.with_only_columns(approvals.c.id).scalar_subquery()
#: The latest approval next to the run's current step, in one row whose step columns are
#: prefixed ``steps_``; no row when either is missing.
LATEST_APPROVAL_WITH_STEP = Prepared(
    _LATEST_APPROVAL.add_columns(
        *(column.label(f"steps_{column.key}") for column in steps.c)
    ).join_from(approvals, steps, steps.c.id == _CURRENT_STEP_ID)
)
#: The latest approval of the run ``b_run_id`` on any step: what a decision that came too
#: late hears of, once the run moved on to a step that has none.
LATEST_APPROVAL_OF_RUN = Prepared(
    select(approvals)
    .where(approvals.c.run_id == bindparam("b_run_id"))
    .order_by(*APPROVALS_NEWEST_FIRST)
    .limit(1)
)
LATEST_DECIDED_APPROVAL_OF_STEP = Prepared(
    select(approvals)
    .where(
        approvals.c.run_id == bindparam("b_run_id"),
        approvals.c.step_id == bindparam("b_step_id"),
        or_(
            approvals.c.status == ApprovalStatus.APPROVED,
            approvals.c.status == ApprovalStatus.REJECTED,
        ),
    )
    .order_by(*APPROVALS_NEWEST_FIRST)
    .limit(1)
)
#: What a decision requires of its approval: still pending and not expired at
#: ``b_now``, and editable when it edits the arguments (``b_edits``).
_DECIDABLE = (
    approvals.c.status == ApprovalStatus.PENDING,
    or_(approvals.c.expires_at.is_(None), approvals.c.expires_at >= bindparam("b_now")),
    or_(approvals.c.editable, bindparam("b_edits", type_=Boolean).is_(False)),
)
#: Decide the run's latest approval if it is decidable, returning it as decided.
DECIDE_LATEST_APPROVAL = Prepared(
    update(approvals)
    .where(
        approvals.c.id == LATEST_APPROVAL_ID,
        *_DECIDABLE,
    )
    .returning(*approvals.c)
)
#: Decide the approval ``b_approval_id`` of the run if it is decidable, returning it as decided.
DECIDE_APPROVAL = Prepared(
    update(approvals)
    .where(
        approvals.c.id == bindparam("b_approval_id"),
        approvals.c.run_id == bindparam("b_run_id"),
        *_DECIDABLE,
    )
    .returning(*approvals.c)
)
APPROVAL_OF_RUN = Prepared(
    select(approvals).where(
        approvals.c.id == bindparam("b_approval_id"), approvals.c.run_id == bindparam("b_run_id")
    )
)

#: End the run's open steps (at ``b_now``), as a cancellation does. A failed step
#: keeps its failure: it is the evidence of why the run stopped.
CANCEL_OPEN_STEPS = Prepared(
    update(steps)
    .where(
        steps.c.run_id == bindparam("b_run_id"),
        or_(
            *(
                steps.c.status == status
                for status in (
                    StepStatus.QUEUED,
                    StepStatus.RUNNING,
                    StepStatus.WAITING_FOR_APPROVAL,
                )
            )
        ),
    )
    .values(
        status=StepStatus.CANCELLED,
        lease_token=None,
        lease_expires_at=None,
        completed_at=bindparam("b_now"),
    )
)
#: End the run's pending approvals, as cancelled by ``b_by`` with the note ``b_note``.
CANCEL_PENDING_APPROVALS = Prepared(
    update(approvals)
    .where(
        approvals.c.run_id == bindparam("b_run_id"),
        approvals.c.status == ApprovalStatus.PENDING,
    )
    .values(
        status=ApprovalStatus.CANCELLED,
        decided_by=bindparam("b_by"),
        decided_at=bindparam("b_now"),
        note=bindparam("b_note"),
    )
)


@cache
def _update_where(table: Table, names: tuple[str, ...]) -> Prepared:
    return Prepared(
        update(table).where(
            table.c.id == bindparam("b_id"),
            *(table.c[name] == bindparam(f"b_{name}") for name in names),
        )
    )


def update_if(
    table: Table, row_id: uuid.UUID, expect: RowLike, values: RowLike
) -> tuple[Prepared, Row]:
    """Update one row of ``table`` only while its columns still equal ``expect``.

    Returns the statement and its parameters, for :meth:`Prepared.expect_one`
    or a guarded write of a :class:`Batch`.
    """
    params = {**values, "b_id": row_id}
    params.update({f"b_{name}": value for name, value in expect.items()})
    return _update_where(table, tuple(sorted(expect))), params


def update_run_if_version(run_id: uuid.UUID, version: int, values: RowLike) -> tuple[Prepared, Row]:
    """Compare-and-set a run on its ``version``, as :func:`update_if` does."""
    return UPDATE_RUN_IF_VERSION, {**values, "b_run_id": run_id, "b_version": version}
