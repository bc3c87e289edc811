"""How many statements and commits an approval round-trip costs, on each backend.

Counted on the DBAPI cursors, so that statements run through SQLAlchemy and
those run straight on the cursor both count; ``BEGIN``, ``COMMIT`` and
``PRAGMA`` do not, nor the empty query (``;``) with which the pool pings a
PostgreSQL connection before each transaction. An ``executemany`` is one
statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, ask_then_work
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria

#: Statements per round-trip: start_run (3 inserts), the WaitForApproval outcome,
#: approve_run, the resume claim and the outcome. PostgreSQL also locks the run
#: before writing each outcome, which SQLite's ``BEGIN IMMEDIATE`` makes needless.
STATEMENTS = {"sqlite": 19, "postgresql": 21}
COMMITS = 5
#: ``approve_run(resume=True)`` decides and claims in one transaction: one commit,
#: one run lock and one run compare-and-set fewer.
FUSED_STATEMENTS = {"sqlite": 16, "postgresql": 18}
FUSED_COMMITS = 4
NOT_COUNTED = ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", ";")

executed: list[str] = []


def _count(query: Any) -> None:
    sql = str(query).lstrip()
    if not sql.upper().startswith(NOT_COUNTED):
        executed.append(sql)


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
    ("trip", "statements", "commit_count"),
    [(round_trip, STATEMENTS, COMMITS), (fused_round_trip, FUSED_STATEMENTS, FUSED_COMMITS)],
    ids=["approve-then-resume", "approve-and-resume"],
)
def test_an_approval_round_trip_stays_within_its_statements(
    counted_app: Flask,
    backend: str,
    trip: Any,
    statements: dict[str, int],
    commit_count: int,
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
        trip()
    sa.event.remove(engine, "commit", count_commit)
    assert len(commits) == commit_count
    assert len(executed) <= statements[backend], "\n".join(executed)
