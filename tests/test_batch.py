"""PostgreSQL: the writes of a transaction held back and sent as one statement."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _helpers import IDENTITY
from conftest import create_test_app

import flask_scoria as scoria
from flask_scoria.errors import StorageError
from flask_scoria.runtime import statements as sql
from flask_scoria.runtime.tables import events, steps
from flask_scoria.storage import Storage

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

sent: list[str] = []


class RecordingCursor(psycopg.Cursor[Any]):
    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return super().execute(query, *args, **kwargs)


@pytest.fixture
def storage(database_uri: str, tmp_path: Path) -> Iterator[Storage]:
    app = create_test_app(database_uri, tmp_path / "instance")
    storage = app.extensions["scoria"].storage(app)

    @sa.event.listens_for(storage.engine, "connect")
    def _recording(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.cursor_factory = RecordingCursor

    with app.app_context():
        yield storage
    storage.engine.dispose()


@pytest.fixture
def queued(storage: Storage) -> tuple[uuid.UUID, uuid.UUID]:
    """A run whose one step stays queued (no handler for its kind): its id and the step's."""
    run = scoria.start_run(IDENTITY, initial_step={"kind": "nobody_handles_this"})
    assert run.current_step_id is not None
    return uuid.UUID(run.run_id), uuid.UUID(str(run.current_step_id))


def _event(run_id: uuid.UUID, sequence: int) -> dict[str, object]:
    return {
        "run_id": run_id,
        "sequence": sequence,
        "event_type": "step_queued",
        "step_id": None,
        "payload": {"n": sequence},
        "created_at": datetime.now(UTC),
    }


@contextmanager
def holding(storage: Storage) -> Iterator[sql.Batch]:
    """A batch in a pipelined write transaction, sent before the commit."""
    sent.clear()
    with storage.write(pipeline=True) as conn:
        batch = sql.Batch(conn)
        yield batch
        batch.send()


def _hold_step_update(
    batch: sql.Batch, step_id: uuid.UUID, expected: str, **values: object
) -> None:
    """Hold an update of the step, guarded: its status must still be ``expected``."""
    batch.add(*sql.update_if(steps, step_id, {"status": expected}, values), guarded=True)


def _statements_sent() -> list[str]:
    return [query for query in sent if query not in ("BEGIN", "COMMIT")]


def _rows(storage: Storage, query: sa.Select[Any]) -> list[Any]:
    with storage.read() as conn:
        return list(conn.execute(query).all())


def test_writes_to_several_tables_leave_as_one_statement(
    storage: Storage, queued: tuple[uuid.UUID, uuid.UUID]
) -> None:
    run_id, step_id = queued
    with holding(storage) as batch:
        _hold_step_update(batch, step_id, "queued", kind="renamed")
        for sequence in (100, 101, 102):
            batch.add(sql.INSERT_EVENTS, _event(run_id, sequence))
    writes = _statements_sent()
    assert len(writes) == 1
    # The three events are rows of one INSERT, sent with PostgreSQL's own placeholders
    # through the connection's cursor class (which recorded it).
    assert writes[0].count("INSERT INTO scoria_events") == 1
    assert "$1" in writes[0] and "%(" not in writes[0]
    found = _rows(storage, sa.select(events.c.payload).where(events.c.sequence >= 100))
    assert sorted(row.payload["n"] for row in found) == [100, 101, 102]
    assert _rows(storage, sa.select(steps.c.kind).where(steps.c.id == step_id)) == [("renamed",)]


def test_a_guarded_write_that_changes_nothing_undoes_the_transaction(
    storage: Storage, queued: tuple[uuid.UUID, uuid.UUID]
) -> None:
    run_id, step_id = queued
    with pytest.raises(StorageError) as caught, holding(storage) as batch:
        batch.add(sql.INSERT_EVENTS, _event(run_id, 200))
        # The step is queued, not running: no row matches.
        _hold_step_update(batch, step_id, "running", kind="x")
    assert sql.unmatched(caught.value)
    assert _rows(storage, sa.select(events.c.sequence).where(events.c.sequence == 200)) == []
    assert _rows(storage, sa.select(steps.c.kind).where(steps.c.id == step_id)) == [
        ("nobody_handles_this",)
    ]


def test_an_update_after_a_write_to_its_table_sees_that_write(
    storage: Storage, queued: tuple[uuid.UUID, uuid.UUID]
) -> None:
    _, step_id = queued
    with holding(storage) as batch:
        _hold_step_update(batch, step_id, "queued", status="running")
        # In one statement, this one would not see the step running, and fail.
        _hold_step_update(batch, step_id, "running", status="completed")
    assert len(_statements_sent()) == 2
    assert _rows(storage, sa.select(steps.c.status).where(steps.c.id == step_id)) == [
        ("completed",)
    ]


def test_a_client_side_cursor_class_gets_pyformat(database_uri: str, tmp_path: Path) -> None:
    """psycopg's ClientCursor, which SQLAlchemy supports as a connection's cursor class,
    binds parameters itself: the statements go to it in their pyformat form."""
    options = {"connect_args": {"cursor_factory": psycopg.ClientCursor}}
    app = create_test_app(database_uri, tmp_path / "i", SCORIA_ENGINE_OPTIONS=options)
    app.extensions["scoria"].handler("work")(lambda step, run: {"done": True})
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "work"})
        assert scoria.get_run(run.run_id).status == "completed"
    app.extensions["scoria"].storage(app).engine.dispose()


def test_a_notify_rides_with_the_writes(
    storage: Storage, queued: tuple[uuid.UUID, uuid.UUID], postgres_url: str
) -> None:
    run_id, _ = queued
    url = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    listener = psycopg.connect(url, autocommit=True)
    listener.execute("LISTEN scoria_steps")
    with holding(storage) as batch:
        batch.notify = "scoria_steps"
        batch.add(sql.INSERT_EVENTS, _event(run_id, 300))
    assert len(_statements_sent()) == 1
    notices = list(listener.notifies(timeout=5, stop_after=1))
    listener.close()
    assert [notice.channel for notice in notices] == ["scoria_steps"]
