"""How many statements, commits and network round trips an approval round-trip costs.

Statements are counted on the DBAPI cursors, so that statements run through
SQLAlchemy and those run straight on the cursor both count; ``BEGIN``,
``COMMIT`` and ``PRAGMA`` do not, nor the empty query (``;``) of a ping. An
``executemany`` is one statement. Round trips are counted on PostgreSQL in
libpq's protocol trace: each time the client sends after the server answered.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, ask_then_work, succeed
from conftest import create_test_app
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects import postgresql

import flask_scoria as scoria
from flask_scoria.runtime import statements as sql
from flask_scoria.runtime import tables
from flask_scoria.runtime.worker import execute_step
from flask_scoria.state import app_state

#: Statements per round-trip: start_run (3 inserts), the WaitForApproval outcome,
#: approve_run, the resume claim and the outcome. On PostgreSQL each transaction is one
#: statement: start 1, outcome 1 (its lock is part of it), approve 1 and the resume's
#: claim 1 (nothing to decide in Python, see ``runtime/one_statement.py``), outcome 1.
#: On SQLite ``BEGIN IMMEDIATE`` locks, and the writes go one by one.
STATEMENTS = {"sqlite": 19, "postgresql": 5}
COMMITS = 5
#: ``approve_run(resume=True)`` decides and claims in one transaction: one commit,
#: one run lock and one run compare-and-set fewer.
FUSED_STATEMENTS = {"sqlite": 16, "postgresql": 4}
FUSED_COMMITS = 4
#: Commits that wait for the disk. A transaction that claims a step for this process,
#: and decides nothing, need not: the call commits the outcome, which waits for both.
#: Left: start_run's outcome, approve_run, and the resume's outcome.
FLUSHES = 3
#: The fused call's transaction holds a decision: it waits, as the outcomes do.
FUSED_FLUSHES = 3
#: How a PostgreSQL transaction says that it does not wait for the disk: in its combined
#: writes, or in a statement of its own when its writes go one by one.
UNFLUSHED = "set_config('synchronous_commit', 'off', true)"
NOT_COUNTED = ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", ";")

WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")

executed: list[str] = []
#: Transactions committed by a statement: a ``COMMIT``, or a write outside ``BEGIN``
#: (on PostgreSQL, a change that is one statement is a transaction of its own).
committed: list[str] = []
#: Statements whose transaction commits without waiting for the disk (PostgreSQL), or
#: SQLite's commits that do not.
unflushed: list[str] = []
in_transaction = [False]
relaxed = [False]


def _count(query: Any) -> None:
    sql = str(query).lstrip()
    upper = sql.upper()
    if UNFLUSHED in sql:
        unflushed.append(sql)
    elif upper.startswith("PRAGMA SYNCHRONOUS="):
        # SQLite (WAL): the level a transaction begins at decides its commit.
        relaxed[0] = upper == "PRAGMA SYNCHRONOUS=NORMAL"
    if upper.startswith("BEGIN"):
        in_transaction[0] = True
    elif upper in ("COMMIT", "ROLLBACK"):
        in_transaction[0] = False
    if upper == "COMMIT":
        committed.append(sql)
    elif not upper.startswith(NOT_COUNTED):
        executed.append(sql)
        if upper.startswith(WRITES) and not in_transaction[0]:
            committed.append(sql)


class CountingSQLiteCursor(sqlite3.Cursor):
    def execute(self, sql: str, *args: Any) -> Any:
        _count(sql)
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        _count(sql)
        return super().executemany(sql, *args)


class CountingSQLiteConnection(sqlite3.Connection):
    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return super().cursor(CountingSQLiteCursor)

    def commit(self) -> None:
        if relaxed[0] and self.in_transaction:
            unflushed.append("COMMIT")
        in_transaction[0] = False
        super().commit()


class CountingPsycopgCursor(psycopg.Cursor[Any]):
    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _count(query)
        return super().execute(query, *args, **kwargs)

    def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _count(query)
        return super().executemany(query, *args, **kwargs)


@pytest.fixture
def counted_app(backend: str, database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    """An app whose database connections count the statements they execute."""
    options = {"connect_args": {"factory": CountingSQLiteConnection}} if backend == "sqlite" else {}
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("approval")(ask_then_work)
    engine = app.extensions["scoria"].storage(app).engine
    if backend == "postgresql":

        @sa.event.listens_for(engine, "connect")
        def _counting_cursors(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.cursor_factory = CountingPsycopgCursor

    yield app
    engine.dispose()


def round_trip() -> None:
    run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
    scoria.approve_run(run.run_id, decided_by="operator")
    assert scoria.resume_run(run.run_id).status == "completed"


def fused_round_trip() -> None:
    run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
    assert scoria.approve_run(run.run_id, decided_by="operator", resume=True).status == "completed"


@pytest.mark.parametrize(
    ("trip", "statements", "commit_count", "flushes"),
    [
        (round_trip, STATEMENTS, COMMITS, FLUSHES),
        (fused_round_trip, FUSED_STATEMENTS, FUSED_COMMITS, FUSED_FLUSHES),
    ],
    ids=["approve-then-resume", "approve-and-resume"],
)
def test_an_approval_round_trip_stays_within_its_statements(
    counted_app: Flask,
    backend: str,
    trip: Any,
    statements: dict[str, int],
    commit_count: int,
    flushes: int,
) -> None:
    commits: list[object] = []

    def count_commit(conn: object) -> None:
        commits.append(conn)

    engine = counted_app.extensions["scoria"].storage(counted_app).engine
    sa.event.listen(engine, "commit", count_commit)
    with counted_app.app_context():
        trip()  # connects; warms the caches
        executed.clear()
        commits.clear()
        committed.clear()
        unflushed.clear()
        trip()
    sa.event.remove(engine, "commit", count_commit)
    # SQLAlchemy commits on SQLite; on PostgreSQL the transactions send their own COMMIT.
    assert len(commits) + len(committed) == commit_count
    assert commit_count - len(unflushed) == flushes, "\n".join(unflushed)
    assert len(executed) == statements[backend], "\n".join(executed)


def test_a_claim_that_records_an_outcome_waits_for_the_disk(counted_app: Flask) -> None:
    """The outcome of a step and the claim of the next are one transaction: its commit
    waits for the disk, so that a crash while the next step runs keeps the outcome."""
    scoria_ext = counted_app.extensions["scoria"]
    scoria_ext.handler("first")(lambda step, run: scoria.Next("second"))
    scoria_ext.handler("second")(succeed)
    with counted_app.app_context():
        scoria.start_run(IDENTITY, initial_step={"kind": "first"})
        committed.clear()
        unflushed.clear()
        run = scoria.start_run(IDENTITY, initial_step={"kind": "first"})
    assert run.status == "completed"
    # The start, which claims the first step, waits for no disk; both outcomes do.
    assert len(unflushed) == 1


def test_a_resume_that_queues_its_step_for_a_worker_waits_for_the_disk(
    counted_app: Flask,
) -> None:
    """``resume_run`` expects to claim the step; when the step goes to a worker instead,
    the resume is all the call commits, and its commit waits for the disk."""
    counted_app.extensions["scoria"].handler("gated", executor="worker")(ask_then_work)
    with counted_app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "gated"})
        step_id = scoria.get_run_detail(run.run_id).steps[0].id
        assert execute_step(run.run_id, step_id).status == "waiting_for_approval"
        scoria.approve_run(run.run_id, decided_by="operator")
        unflushed.clear()
        resumed = scoria.resume_run(run.run_id)
        # On PostgreSQL the statement that claims an approved step in one go comes
        # first; it finds no step to claim here and writes nothing.
        assert [text for text in unflushed if not text.startswith("WITH locked")] == []
        assert resumed.status == "running"
        assert scoria.get_run_detail(run.run_id).steps[0].status == "queued"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_worker_claim_does_not_wait_for_the_disk(counted_app: Flask) -> None:
    """The worker's claim is a transaction of its own, statement by statement: on
    PostgreSQL it still commits without waiting, and the outcome waits."""
    counted_app.extensions["scoria"].handler("later", executor="worker")(succeed)
    with counted_app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "later"})
        committed.clear()
        unflushed.clear()
        (done,) = scoria.dispatch_queued()
    assert done.run_id == run.run_id and done.status == "completed"
    assert len(unflushed) == 1
    assert unflushed[0].startswith("SELECT set_config")


class RoundTrips:
    """Counts the round trips of every connection of an engine, in libpq's protocol trace."""

    def __init__(self, engine: sa.Engine, folder: Path) -> None:
        self.folder = folder
        self.files: list[Any] = []
        sa.event.listen(engine, "connect", self._trace)

    def _trace(self, dbapi_connection: Any, _record: Any) -> None:
        out = (self.folder / f"{len(self.files)}.trace").open("a")
        dbapi_connection.pgconn.trace(out.fileno())
        dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        self.files.append(out)

    def count(self, call: Callable[[], object]) -> int:
        """How many round trips ``call()`` waited for, on all connections together."""
        before = self._sends()
        call()
        return self._sends() - before

    def _sends(self) -> int:
        sends = 0
        for out in self.files:
            out.flush()
            previous = "B"
            for line in Path(out.name).read_text().splitlines():
                direction = line[:1]
                if direction == "F" and previous == "B":
                    sends += 1
                if direction in ("F", "B"):
                    previous = direction
        return sends


#: Round trips per call on PostgreSQL, commits included: a new run is one; a transition
#: is two, one for the run's lock with what the decision reads, one for its writes with
#: the COMMIT. An approval, and the claim of an approved step, need nothing decided in
#: Python: they are one statement, its own transaction. A call that executes a handler
#: adds the transition of its outcome, one round trip: it decides on the run it
#: committed, and its lock travels with its writes. A lease renewal is one statement.
ROUND_TRIPS = {
    "start_run, paused by its handler": 1 + 1,
    "approve_run": 1,
    "resume_run, the handler completes": 1 + 1,
    "approve_run(resume=True)": 1 + 1,
    "cancel_run": 2,
    "a worker's or Celery task's step, claimed and executed": 2 + 1,
    "a lease renewal": 1,
    "get_run": 1,
}


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_each_call_stays_within_its_round_trips(database_uri: str, tmp_path: Path) -> None:
    # Without the ping of a connection idle for a second, which a loaded machine may cause.
    options = {"pool_pre_ping": False}
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("approval")(ask_then_work)
    app.extensions["scoria"].handler("later", executor="worker")(succeed)
    state = app_state(app)
    engine = state.storage.engine
    trips = RoundTrips(engine, tmp_path)
    counted: dict[str, int] = {}
    with app.app_context():
        # psycopg prepares a statement once it ran a few times (prepare_threshold);
        # outside a pipeline that costs a round trip, once. Counted: the last pass.
        for _warm_then_count in range(7):
            run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
            fused = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
            cancelled = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
            step_id = scoria.get_run_detail(cancelled.run_id).steps[0].id
            queued = scoria.start_run(IDENTITY, initial_step={"kind": "later"})
            queued_step_id = scoria.get_run_detail(queued.run_id).steps[0].id
            calls: dict[str, Callable[[], object]] = {
                "start_run, paused by its handler": partial(
                    scoria.start_run, IDENTITY, initial_step={"kind": "approval"}
                ),
                "approve_run": partial(scoria.approve_run, run.run_id, decided_by="operator"),
                "resume_run, the handler completes": partial(scoria.resume_run, run.run_id),
                "approve_run(resume=True)": partial(
                    scoria.approve_run, fused.run_id, decided_by="operator", resume=True
                ),
                "cancel_run": partial(scoria.cancel_run, cancelled.run_id, cancelled_by="operator"),
                "a worker's or Celery task's step, claimed and executed": partial(
                    execute_step, queued.run_id, queued_step_id
                ),
                # The keeper's statement, whether or not the step still holds that lease.
                "a lease renewal": partial(
                    state.keeper._renew, state.storage, uuid.UUID(step_id), "lease-token"
                ),
                "get_run": partial(scoria.get_run, run.run_id),
            }
            counted = {name: trips.count(call) for name, call in calls.items()}
        assert scoria.get_run(run.run_id).status == "completed"
        assert scoria.get_run(fused.run_id).status == "completed"
        assert scoria.get_run(queued.run_id).status == "completed"
    engine.dispose()
    for out in trips.files:
        out.close()
    assert counted == ROUND_TRIPS


def test_a_statement_for_psycopg_numbers_each_parameter_once() -> None:
    """The native form names each parameter by its first position, and unescapes ``%%``."""
    compiled = sql._Compiled(
        sql="SELECT %(a)s, %(b)s WHERE x LIKE 'p%%' AND y = %(a)s",
        positional=None,
        defaults={},
        binds=(),
        columns=(),
    )
    assert compiled.native == ("SELECT $1, $2 WHERE x LIKE 'p%' AND y = $1", ("a", "b"))


def test_held_rows_of_one_insert_share_its_values_list_unless_it_has_a_suffix() -> None:
    """Rows of a plain INSERT become one VALUES list; an INSERT ... ON CONFLICT keeps its
    rows apart, since its clause would apply to the first row's list only."""
    dialect: sa.Dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
    event = {"run_id": None, "sequence": 1, "event_type": "x", "payload": None}
    events = sql.Prepared(sa.insert(tables.events))
    runs = sql.INSERT_RUN_IF_NEW["postgresql"]
    run = {column.key: None for column in tables.runs.c}

    def held(statement: sql.Prepared, params: dict[str, Any]) -> Any:
        compiled = statement._compile(dialect, frozenset(params))
        return sql._Held(statement, compiled, compiled.parameters(params), guarded=False)

    merged = sql._combine([held(events, event), held(events, event)], None).sql
    assert merged.count("INSERT INTO scoria_events") == 1
    assert "%(w0_sequence)s" in merged and "%(w1_sequence)s" in merged
    apart = sql._combine([held(runs, run), held(runs, run)], None).sql
    assert apart.count("INSERT INTO scoria_runs") == 2
    assert apart.count("ON CONFLICT DO NOTHING") == 2


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_sqlite_connection_gets_its_synchronous_level_back(
    database_uri: str, tmp_path: Path
) -> None:
    """After a commit that did not wait for the disk, and after one that failed, the
    pooled connection's commits wait again."""
    options = {"pool_size": 1, "max_overflow": 0}
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("approval")(ask_then_work)
    engine = app.extensions["scoria"].storage(app).engine

    def level() -> int:
        with engine.connect() as conn:
            value: int = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
        return value

    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
        assert level() == 2  # FULL
        scoria.approve_run(run.run_id, decided_by="operator")
        assert scoria.resume_run(run.run_id).status == "completed"
        assert level() == 2
        # resume_run expects to claim: its transaction begins relaxed, then refuses.
        with pytest.raises(scoria.RunNotResumable):
            scoria.resume_run(run.run_id)
        assert level() == 2
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_postgresql_connection_leaves_autocommit_when_returned(
    database_uri: str, tmp_path: Path
) -> None:
    """Transitions and reads run in the driver's autocommit; the pooled connection comes
    back in its own mode, outside any transaction, after a success and after a failure."""
    options = {"pool_size": 1, "max_overflow": 0}
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("approval")(ask_then_work)
    engine = app.extensions["scoria"].storage(app).engine

    def mode() -> tuple[bool, str]:
        with engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            return driver.autocommit, driver.info.transaction_status.name

    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
        assert mode() == (False, "IDLE")
        scoria.approve_run(run.run_id, decided_by="operator", resume=True)
        assert scoria.get_run(run.run_id).status == "completed"
        assert mode() == (False, "IDLE")
        with pytest.raises(scoria.ApprovalAlreadyDecided):
            scoria.approve_run(run.run_id, decided_by="operator", resume=True)
        assert mode() == (False, "IDLE")
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_connection_keeps_one_idle_cursor_per_statement_without_its_result(
    database_uri: str, tmp_path: Path
) -> None:
    """A statement run again on a connection reuses its cursor, which holds no result in
    between; two runs of one statement at once each get a cursor of their own; a pipelined
    statement, whose result arrives later, keeps none."""
    options = {"pool_size": 1, "max_overflow": 0}
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("approval")(ask_then_work)
    storage = app.extensions["scoria"].storage(app)
    with app.app_context():
        first = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
        second = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
    by_id = sql.RUN_BY_ID
    with storage.write(pipeline=True) as conn:
        assert by_id.first(conn, {"b_run_id": uuid.UUID(first.run_id)}) is not None
    with storage.autocommit() as conn:
        kept = conn.connection.info["scoria_cursors"]
        assert kept, "a transition's statements leave their cursors behind"
        sql_text = by_id._compile(conn.dialect, frozenset({"b_run_id"})).native[0]
        assert sql_text not in kept, "a pipelined statement's cursor is closed, not kept"
        # No result stays behind, in the cursor or in its adapters.
        assert all(
            cursor.pgresult is None and cursor._tx.pgresult is None and not cursor.closed
            for cursor in kept.values()
        )
        one = by_id.send(conn, {"b_run_id": uuid.UUID(first.run_id)})
        other = by_id.send(conn, {"b_run_id": uuid.UUID(second.run_id)})
        cursor = other.cursor
        assert cursor is not one.cursor
        rows = [one.first(), other.first()]
        assert [row["id"] for row in rows if row] == [
            uuid.UUID(first.run_id),
            uuid.UUID(second.run_id),
        ]
        again = by_id.send(conn, {"b_run_id": uuid.UUID(second.run_id)})
        assert again.cursor is cursor
        assert again.first() is not None
        with pytest.raises(AttributeError):
            again.first()  # read once: its cursor may be running another statement
        # The least recently used cursors go once a connection keeps too many.
        for number in range(100):
            sql.Prepared(sa.select(sa.literal(number).label(f"n{number}"))).first(conn, {})
        assert len(kept) == sql._KEPT_CURSORS_MAX
        assert cursor.closed and sql_text not in kept
    storage.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_host_engine_keeps_no_cursors(database_uri: str, tmp_path: Path) -> None:
    """The host app's connections may change their adapters or encoding: each statement
    gets a new cursor there."""
    app = Flask("host", instance_path=str(tmp_path / "instance"))
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    db = SQLAlchemy(app)
    scoria.Scoria(app, db=db).handler("approval")(ask_then_work)
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "approval"})
        scoria.approve_run(run.run_id, decided_by="operator", resume=True)
        assert scoria.get_run(run.run_id).status == "completed"
        with db.engine.connect() as conn:
            assert "scoria_cursors" not in conn.connection.info
        db.engine.dispose()
